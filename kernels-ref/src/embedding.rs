//! Token embedding lookup, forward and backward.
//!
//! Math: `out[i] = table[ids[i]]`. Backward scatters each row of `dout` back to the table row
//! it came from: `dtable[v] = Σ_{i: ids[i] = v} dout[i]`. The sum for each table row runs over
//! its tokens in order of position, in f64, so the result is deterministic and independent of
//! the thread count (a GPU kernel with atomics is not; compare with a tolerance).

use rayon::prelude::*;

/// `out (N, C) = table (V, C)[ids (N)]`.
pub fn embedding_forward(out: &mut [f32], ids: &[u32], table: &[f32], dim: usize) {
    assert!(dim > 0, "embedding_forward: dim must be positive");
    assert_eq!(table.len() % dim, 0, "embedding_forward: table length is not a multiple of dim");
    assert_eq!(out.len(), ids.len() * dim, "embedding_forward: out must hold N*C");
    let vocab = table.len() / dim;
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(row, &id)| {
        let id = id as usize;
        assert!(id < vocab, "embedding_forward: token id {id} out of range for vocab {vocab}");
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    });
}

/// `dtable (V, C)`, overwritten, from `dout (N, C)` and `ids (N)`.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) {
    assert!(dim > 0, "embedding_backward: dim must be positive");
    assert_eq!(dtable.len() % dim, 0, "embedding_backward: dtable length is not a multiple of dim");
    assert_eq!(dout.len(), ids.len() * dim, "embedding_backward: dout must hold N*C");
    let vocab = dtable.len() / dim;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        panic!("embedding_backward: token id {bad} out of range for vocab {vocab}");
    }
    // Positions sorted by (token id, position): each table row's tokens form one run.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| (ids[i], i));
    dtable.par_chunks_mut(dim).enumerate().for_each(|(v, row)| {
        let start = order.partition_point(|&i| (ids[i] as usize) < v);
        let end = order.partition_point(|&i| (ids[i] as usize) <= v);
        for (c, out) in row.iter_mut().enumerate() {
            let s: f64 = order[start..end].iter().map(|&i| dout[i * dim + c] as f64).sum();
            *out = s as f32;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn by_hand() {
        // table rows: 0 -> [1, 2], 1 -> [3, 4], 2 -> [5, 6]; ids [2, 0, 2].
        let table = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0.0; 6];
        embedding_forward(&mut out, &[2, 0, 2], &table, 2);
        assert_eq!(out, [5.0, 6.0, 1.0, 2.0, 5.0, 6.0]);
        // dout rows [1, 10], [100, 1000], [2, 20]: row 2 gets [1+2, 10+20], row 0 gets
        // [100, 1000], row 1 is never used and is zeroed even though it held garbage.
        let mut dtable = [7.0; 6];
        embedding_backward(&mut dtable, &[1.0, 10.0, 100.0, 1000.0, 2.0, 20.0], &[2, 0, 2], 2);
        assert_eq!(dtable, [100.0, 1000.0, 0.0, 0.0, 3.0, 30.0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = rng(40);
        for (n, vocab, dim) in [(1, 1, 1), (7, 3, 5), (13, 5, 3), (5, 11, 7)] {
            let ids: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
            let table = uniform(&mut rng, vocab * dim, -1.0, 1.0);
            let w = uniform(&mut rng, n * dim, -1.0, 1.0);
            let mut dtable = vec![f32::NAN; vocab * dim];
            embedding_backward(&mut dtable, &w, &ids, dim);
            // L is linear in the table (h = 0.5, no truncation error) and the outputs are exact
            // copies, so the only error is the analytic sum (< 13) rounded once to f32: < 1e-6.
            check_grad("embedding dtable", &table, &dtable, 0.5, 1e-6, 1e-6, 64, &mut rng, |t| {
                let mut out = vec![0.0; n * dim];
                embedding_forward(&mut out, &ids, t, dim);
                weighted_sum(&w, &out)
            });
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn out_of_range_id_panics() {
        let mut out = [0.0; 2];
        embedding_forward(&mut out, &[3], &[0.0; 6], 2);
    }
}
