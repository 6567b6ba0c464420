//! The GPU runtime: adapter selection, typed errors instead of panics, the mobile profile's
//! limits enforced by validation, buffer pooling, and program order under concurrent use.

mod common;

use pockettune::gpu::{adapter, KernelKey};
use pockettune::kernels::elementwise;
use pockettune::{Error, Gpu, GpuOptions, Profile, Tensor};

#[test]
fn no_adapter_is_a_clear_error() {
    let err = adapter::select(&[], None).unwrap_err();
    assert!(matches!(err, Error::NoAdapter { .. }), "{err}");
    assert!(err.to_string().contains("mesa-vulkan-drivers"), "the error says what to install: {err}");
}

#[test]
fn unknown_device_lists_the_adapters() {
    let Some(_) = common::gpu() else { return };
    let instance = adapter::instance();
    let adapters = adapter::enumerate(&instance);
    let err = adapter::select(&adapters, Some("no-such-gpu-anywhere")).unwrap_err();
    let Error::DeviceNotFound { found, .. } = &err else { panic!("unexpected error {err}") };
    assert!(found.contains(&adapters[0].get_info().name), "{err}");
    // By index and by (case-insensitive) name substring the same adapter is found.
    let name = adapters[0].get_info().name.to_uppercase();
    assert_eq!(adapter::select(&adapters, Some("0")).unwrap().0, 0);
    assert_eq!(adapter::select(&adapters, Some(&name[..3])).unwrap().1.name, adapters[0].get_info().name);
}

#[test]
fn buffer_above_the_binding_limit_is_refused() {
    let Some(gpu) = common::gpu() else { return };
    let err = gpu.alloc(gpu.max_binding() + 4, "too big").unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}

/// Five storage buffers in one shader: allowed by most desktop adapters, refused by a phone.
const FIVE_BUFFERS: &str = r#"
@group(0) @binding(0) var<uniform> n: vec4<u32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read> d: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(1)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    out[id.x] = a[id.x] + b[id.x] + c[id.x] + d[id.x];
}
"#;

#[test]
fn kernel_over_mobile_limits_fails_validation_not_panics() {
    let Some(gpu) = common::gpu() else { return };
    gpu.register_shader("five_buffers", FIVE_BUFFERS);
    let err = gpu.pipeline(&KernelKey::new("five_buffers", "main")).unwrap_err();
    assert!(matches!(err, Error::Validation { .. }), "{err}");
    assert_eq!(gpu.profile(), Profile::Mobile);

    // The same kernel runs under the adapter's own limits where it offers five buffers.
    let opened = Gpu::new(&GpuOptions { device: None, profile: Profile::Adapter });
    let wide = opened.expect("the adapter that opened under mobile limits opens under its own");
    if wide.limits().max_storage_buffers_per_shader_stage >= 5 {
        wide.register_shader("five_buffers", FIVE_BUFFERS);
        wide.pipeline(&KernelKey::new("five_buffers", "main")).expect("valid under adapter limits");
    }
}

#[test]
fn bad_wgsl_is_a_typed_error() {
    let Some(gpu) = common::gpu() else { return };
    gpu.register_shader("broken", "@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }");
    let err = gpu.pipeline(&KernelKey::new("broken", "main")).unwrap_err();
    assert!(matches!(err, Error::Validation { ref context, .. } if context.contains("broken")), "{err}");
}

#[test]
fn freed_buffers_are_reused() {
    let Some(gpu) = common::gpu() else { return };
    // A size no other test uses, so the pool's counters move only because of this test.
    let shape = [12345 + 7];
    drop(Tensor::empty(gpu, &shape, "first").unwrap());
    let before = gpu.bytes_allocated().0;
    for _ in 0..10 {
        drop(Tensor::empty(gpu, &shape, "again").unwrap());
    }
    assert!(gpu.bytes_allocated().0 <= before, "allocating a freed size again grew the pool");
}

/// Live bytes count what tensors use now; held bytes also count what the pool keeps for reuse.
#[test]
fn live_and_held_bytes() {
    if common::gpu().is_none() {
        return;
    }
    // A device of its own: the shared one's counters move with the other tests.
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }).unwrap();
    let (live0, held0) = (gpu.bytes_live().0, gpu.bytes_allocated().0);
    let size = (1000 * 4u64).next_multiple_of(256); // the pool rounds to 256 bytes
    let a = Tensor::empty(&gpu, &[1000], "a").unwrap();
    let b = Tensor::empty(&gpu, &[1000], "b").unwrap();
    assert_eq!(gpu.bytes_live().0, live0 + 2 * size);
    assert_eq!(gpu.bytes_allocated().0, held0 + 2 * size);
    drop((a, b));
    assert_eq!(gpu.bytes_live(), (live0, live0 + 2 * size), "freed: live drops, its peak stays");
    assert_eq!(gpu.bytes_allocated().0, held0 + 2 * size, "the pool keeps both buffers");
    gpu.reset_live_peak();
    let c = Tensor::empty(&gpu, &[1000], "c").unwrap();
    assert_eq!(gpu.bytes_live(), (live0 + size, live0 + size), "a reused buffer is live again");
    assert_eq!(gpu.bytes_allocated().0, held0 + 2 * size, "reuse allocates nothing");
    drop(c);
}

/// Regression: uploads with no dispatch between them (loading a model) were never submitted
/// until the first step, so wgpu held a staging copy of every weight: a second copy of the
/// model in memory. Staged writes now go out in halves of a 64 MiB ring: a submission each time
/// 32 MiB have been staged (and a wait only for the oldest half once the ring is full).
#[test]
fn uploads_are_submitted_in_bounded_batches() {
    if common::gpu().is_none() {
        return;
    }
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }).unwrap();
    let before = gpu.submissions();
    let data = vec![1.5f32; 10 << 18]; // 10 MiB
    let tensors: Vec<Tensor> =
        (0..16).map(|_| Tensor::from_host(&gpu, &data, &[data.len()], "w").unwrap()).collect();
    // 160 MiB staged in 10 MiB writes: a submission after every fourth (40 MiB >= 32 MiB)
    assert_eq!(gpu.submissions() - before, 4);
    assert_eq!(tensors[15].to_host(&gpu).unwrap()[12345], 1.5);
}

/// Regression: `write` used to submit the pending encoder and queue the host write without
/// holding the lock in between, so another thread's flush could take the encoder first and
/// the write then ran before commands recorded earlier. Pooled (reused) buffers made results
/// of one thread appear in another's.
#[test]
fn host_writes_keep_program_order_across_threads() {
    let Some(gpu) = common::gpu() else { return };
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for i in 0..60 {
                    let v = (t * 1000 + i) as f32;
                    let x = Tensor::from_host(gpu, &[v; 7], &[7], "x").unwrap();
                    let y = Tensor::empty(gpu, &[7], "y").unwrap();
                    elementwise::axpby(gpu, &y, &x, 2.0, 0.0).unwrap();
                    drop(x); // back to the pool while the dispatch that reads it is pending
                    let z = Tensor::from_host(gpu, &[-1.0; 7], &[7], "z").unwrap();
                    assert_eq!(y.to_host(gpu).unwrap(), vec![2.0 * v; 7], "thread {t} iteration {i}");
                    drop(z);
                }
            });
        }
    });
}

#[test]
fn device_loss_is_a_typed_error() {
    let Some(_) = common::gpu() else { return };
    // A device of its own: the shared one must survive for the other tests.
    let gpu = Gpu::new(&GpuOptions::default()).expect("the adapter opened once opens again");
    let t = Tensor::from_host(&gpu, &[1.0, 2.0], &[2], "before").unwrap();
    gpu.destroy();
    let err = elementwise::axpby(&gpu, &t, &t, 2.0, 0.0).and_then(|_| t.to_host(&gpu)).unwrap_err();
    assert!(matches!(err, Error::DeviceLost { .. }), "{err}");
    assert!(err.to_string().contains("--resume"), "the error says how to go on: {err}");
}

/// While a submit gate is installed (a power policy), the work of a step goes out in
/// submissions of at most `GATED_BATCH` dispatches, each announced to the gate, so the gate can
/// hold back a long step; without one, the same work stays in one pending submission.
#[test]
fn a_submit_gate_sees_the_work_in_bounded_batches() {
    use pockettune::gpu::{SubmitGate, GATED_BATCH};
    use std::sync::{Arc, Mutex};
    struct Count(Mutex<Vec<usize>>);
    impl SubmitGate for Count {
        fn before_submit(&self, dispatches: usize) {
            self.0.lock().unwrap().push(dispatches);
        }
    }
    let Some(_) = common::gpu() else { return };
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }).unwrap();
    let x = Tensor::from_host(&gpu, &[1.0; 64], &[64], "x").unwrap();
    let y = Tensor::from_host(&gpu, &[0.0; 64], &[64], "y").unwrap();
    let n = 3 * GATED_BATCH + 5;
    let before = gpu.submissions();
    for _ in 0..n {
        elementwise::axpby(&gpu, &y, &x, 2.0, 0.0).unwrap();
    }
    assert_eq!(gpu.submissions(), before, "no gate: recorded, not submitted");
    gpu.flush().unwrap();
    let gate = Arc::new(Count(Mutex::new(Vec::new())));
    gpu.set_submit_gate(Some(gate.clone()));
    for _ in 0..n {
        elementwise::axpby(&gpu, &y, &x, 2.0, 0.0).unwrap();
    }
    gpu.flush().unwrap();
    let seen = gate.0.lock().unwrap().clone();
    assert_eq!(seen, vec![GATED_BATCH, GATED_BATCH, GATED_BATCH, 5], "batches the gate saw");
    assert_eq!(y.to_host(&gpu).unwrap(), vec![2.0; 64]);
}

/// `Gpu::stats` counts the host's side of the work: a tensor split into chunks costs one
/// dispatch per chunk, recorded work stays pending until something needs a number, and each
/// chunk read back is one submission and one wait for the GPU.
#[test]
fn stats_count_dispatches_submissions_and_waits() {
    use pockettune::gpu::Split;
    let Some(_) = common::gpu() else { return };
    // A device of its own: the shared one's counters move with the other tests.
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }).unwrap();
    let (rows, cols, per_chunk) = (10, 4, 3);
    let chunks = 4; // rows 0-2, 3-5, 6-8 and 9
    let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let x = Tensor::from_host_split(&gpu, &data, &[rows, cols], Split::Rows, per_chunk, "x").unwrap();
    let y =
        Tensor::from_host_split(&gpu, &vec![0.0; rows * cols], &[rows, cols], Split::Rows, per_chunk, "y")
            .unwrap();
    let calls = 5;
    let before = gpu.stats();
    for _ in 0..calls {
        elementwise::axpby(&gpu, &y, &x, 1.0, 1.0).unwrap(); // y += x
    }
    let recorded = gpu.stats().since(&before);
    assert_eq!(recorded.dispatches, calls * chunks, "one dispatch per chunk and call");
    assert_eq!(recorded.submissions, 0, "recorded, not yet submitted");
    assert!(recorded.record_ns > 0);
    assert_eq!(recorded.submit_ns, 0, "nothing submitted yet");

    let got = y.to_host(&gpu).unwrap();
    let read = gpu.stats().since(&before);
    assert_eq!(got, data.iter().map(|v| calls as f32 * v).collect::<Vec<_>>());
    assert_eq!(read.dispatches, calls * chunks, "reading dispatches nothing");
    assert_eq!(read.submissions, chunks, "the first read carries the dispatches; one copy each after it");
    assert!(read.waits >= chunks && read.wait_ns > 0, "each read waits for the GPU: {read:?}");
    assert!(
        read.submit_ns > 0 && read.submit_ns <= read.record_ns,
        "submit time is part of recording: {read:?}"
    );
}

/// Errors are checked per submission, not by a blocking error-scope pop per dispatch: a
/// dispatch with a binding left out is recorded without a wait, and the submission that
/// carries it fails with a validation error that names the kernel.
#[test]
fn a_bad_dispatch_fails_its_submission_naming_the_kernel() {
    let Some(_) = common::gpu() else { return };
    // A device of its own: the error must not reach another test's submission.
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }).unwrap();
    let y = Tensor::from_host(&gpu, &[0.0; 64], &[64], "y").unwrap();
    let key = KernelKey::new("elementwise", "axpby");
    gpu.pipeline(&key).unwrap(); // compiled (and its error scope popped) before counting
    let before = gpu.stats();
    // elementwise.wgsl's Params: n = 64, the other seven fields zero
    let params: Vec<u8> = [64u32, 0, 0, 0, 0, 0, 0, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    // axpby reads binding 2: leaving it out is a bind group that does not match the layout
    let out = [Some(y.chunks()[0].bind())];
    gpu.dispatch(&key, &out, &params, [1, 1, 1]).expect("recorded; the error comes at the submission");
    assert_eq!(gpu.stats().since(&before).waits, 0, "no blocking pop per dispatch");
    let err = gpu.flush().unwrap_err();
    assert!(matches!(err, Error::Validation { .. }), "{err}");
    assert!(err.to_string().contains("elementwise::axpby"), "the error names the kernel: {err}");
    // The device goes on: the next submission is checked on its own.
    let x = Tensor::from_host(&gpu, &[1.5; 64], &[64], "x").unwrap();
    elementwise::axpby(&gpu, &y, &x, 2.0, 0.0).unwrap();
    assert_eq!(y.to_host(&gpu).unwrap(), vec![3.0; 64]);

    // An error only the submission finds (one buffer bound read-write and read-only in one
    // dispatch) names the kernels that submission carried.
    elementwise::fill(&gpu, &x, 1.0).unwrap();
    elementwise::axpby(&gpu, &y, &y, 2.0, 0.0).unwrap();
    let err = gpu.flush().unwrap_err();
    assert!(matches!(err, Error::Validation { .. }), "{err}");
    let Error::Validation { context, .. } = &err else { unreachable!() };
    assert!(
        // (64 elements: the vec4 variants of both, elementwise_vec4.wgsl)
        context.contains("elementwise_vec4::axpby") && context.contains("elementwise_vec4::fill"),
        "the error names the submission's kernels: {err}"
    );
    gpu.sync().expect("checked once, the error is not reported again");
}

/// Bind groups are made once and found again when a submission repeats the dispatches of an
/// earlier one on the same buffers; the parameters still change with every dispatch. 300
/// dispatches fill more than one segment of the uniform ring (256 slots each).
#[test]
fn repeated_dispatches_reuse_bind_groups_with_fresh_parameters() {
    let Some(_) = common::gpu() else { return };
    // A device of its own: the shared one's counters move with the other tests.
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }).unwrap();
    let x = Tensor::from_host(&gpu, &[1.0; 64], &[64], "x").unwrap();
    let y = Tensor::from_host(&gpu, &[0.0; 64], &[64], "y").unwrap();
    let n = 300;
    let round = |scale: f32| {
        let before = gpu.stats();
        for k in 1..=n {
            elementwise::axpby(&gpu, &y, &x, scale * k as f32, 1.0).unwrap(); // y += scale k x
        }
        gpu.flush().unwrap();
        gpu.stats().since(&before)
    };
    let sum = (n * (n + 1) / 2) as f32; // exact in f32
    let first = round(1.0);
    assert_eq!(first.dispatches, n as u64);
    assert_eq!(first.bind_groups, n as u64, "each slot of a new submission binds anew");
    assert_eq!(y.to_host(&gpu).unwrap(), vec![sum; 64]);
    let again = round(2.0);
    assert_eq!(again.dispatches, n as u64);
    assert_eq!(again.bind_groups, 0, "the same dispatches in the same slots: every bind group reused");
    assert_eq!(y.to_host(&gpu).unwrap(), vec![3.0 * sum; 64], "each dispatch read its own new parameters");
}

/// A cached bind group holds its buffers: the cache is emptied whenever the pool gives buffers
/// back to the driver, so it never keeps memory that the pool no longer counts, and a buffer
/// made after that is bound anew.
#[test]
fn trimming_the_pool_drops_the_cached_bind_groups() {
    let Some(_) = common::gpu() else { return };
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }).unwrap();
    let held0 = gpu.bytes_allocated().0;
    let x = Tensor::from_host(&gpu, &[1.0; 1000], &[1000], "x").unwrap();
    let y = Tensor::from_host(&gpu, &[0.0; 1000], &[1000], "y").unwrap();
    elementwise::axpby(&gpu, &y, &x, 2.0, 0.0).unwrap();
    gpu.sync().unwrap();
    assert_eq!(gpu.cached_bind_groups(), 1);
    drop((x, y));
    gpu.trim();
    assert_eq!(gpu.cached_bind_groups(), 0, "trim drops the bind groups that hold the freed buffers");
    assert_eq!(gpu.bytes_allocated().0, held0, "the pool holds nothing of them");

    let before = gpu.stats();
    let x = Tensor::from_host(&gpu, &[1.0; 1000], &[1000], "x").unwrap();
    let y = Tensor::from_host(&gpu, &[0.0; 1000], &[1000], "y").unwrap();
    elementwise::axpby(&gpu, &y, &x, 3.0, 0.0).unwrap();
    assert_eq!(gpu.stats().since(&before).bind_groups, 1, "new buffers, a new bind group");
    assert_eq!(y.to_host(&gpu).unwrap(), vec![3.0; 1000]);

    // Under a memory budget the pool trims by itself to make room: the cache goes with it.
    drop((x, y));
    gpu.set_memory_budget(Some(gpu.bytes_allocated().0 + 1024));
    let z = Tensor::empty(&gpu, &[2000], "z").unwrap();
    assert_eq!(gpu.cached_bind_groups(), 0, "the budget's trim dropped the cache too");
    drop(z);
}
