"""The text task's report: corpus BLEU of the trained lattice next to the baselines of the same split."""
from __future__ import annotations

import time

import torch

from .bleu import best_constant, best_matches, corpus_bleu

__all__ = ["evaluate_qa", "qa_summary"]


def evaluate_qa(trainer) -> dict:
    """Corpus BLEU (0–100) on every training and held-out pair of the split:

    * ``lattice`` — the trained lattice and readout, decoded by the answer bank;
    * ``identity_lattice`` — the question's own vector decoded by the answer
      bank (a lattice that passes its input through unchanged);
    * ``copy_question`` — the question as the answer;
    * ``constant_answer`` — the one training answer with the best corpus BLEU
      on the training pairs, given for every question;
    * ``tfidf_retrieval`` (held out) — the answer of the training question
      nearest by plain (unprojected) TF-IDF cosine;
    * ``untrained_lattice_ridge`` — the lattice with its initial weights (stage
      1's, resampled to the final dims and pruned as the last stage) and a
      closed-form ridge readout (α = ``decoder_alpha``) fitted on every
      training pair: what a readout alone gets from an untrained lattice;
    * ``answer_bank_oracle`` — per pair the bank answer with the best sentence
      BLEU against the reference (held out; on the training pairs it is 100 by
      construction: every training answer is in the bank).
    """
    task, data = trainer.qa, trainer.data
    st = trainer.cfg.stages[-1]
    dims = tuple(trainer.w.shape[1:])
    t0 = time.perf_counter()
    bank = task.bank
    out = dict(train={}, held_out={}, pairs=dict(train=len(data.train_q), held_out=len(data.test_q),
                                                 answer_bank=len(bank.texts)))
    sets = dict(train=(data.train_q, data.train_a, task.q_train), held_out=(data.test_q, data.test_a, task.q_test))
    const = best_constant(bank.texts, data.train_a)
    out["constant_answer_text"] = bank.texts[const]
    examples = []
    for name, (qs, refs, Q) in sets.items():
        hyp = bank.decode(task.predict(trainer.w, trainer.mask, Q, dims, st))
        res = out[name]
        res["lattice"] = corpus_bleu(hyp, refs)
        res["identity_lattice"] = corpus_bleu(bank.decode(Q), refs)
        res["copy_question"] = corpus_bleu(qs, refs)
        res["constant_answer"] = corpus_bleu([bank.texts[const]] * len(refs), refs)
        spread = range(0, len(qs), max(1, len(qs) // 3))[:3]   # three pairs spread over the set
        examples += [dict(set=name, question=qs[i], decoded=hyp[i], reference=refs[i]) for i in spread]
    ridge = _untrained_ridge(trainer, dims, st)
    for name, (_, refs, Q) in sets.items():
        out[name]["untrained_lattice_ridge"] = corpus_bleu(bank.decode(ridge(Q)), refs)
    tr = task.encoder.tfidf(data.train_q)
    nearest = []
    for i in range(0, len(data.test_q), 64):
        te = task.encoder.tfidf(data.test_q[i:i + 64]).to_dense()
        nearest += torch.sparse.mm(tr, te.T).argmax(0).tolist()
    out["held_out"]["tfidf_retrieval"] = corpus_bleu([data.train_a[i] for i in nearest], data.test_a)
    oracle = best_matches(bank.texts, data.test_a)
    out["held_out"]["answer_bank_oracle"] = corpus_bleu([bank.texts[i] for i in oracle], data.test_a)
    out["train"]["answer_bank_oracle"] = 100.0
    out["examples"] = examples
    out["seconds"] = time.perf_counter() - t0
    return out


def _untrained_ridge(trainer, dims, st):
    """A function: question vectors → the answer vectors a ridge readout of the untrained lattice predicts."""
    from .monitor import RidgeDecoder
    from .transfer import resample_field
    from .trainer import prune_stage

    cfg, task = trainer.cfg, trainer.qa
    w0 = resample_field(trainer.w_initial, dims).clamp_(cfg.rule.w_min, cfg.rule.w_max)
    mask0 = None
    if st.sparse_keep < 1:
        w0, mask0 = prune_stage(w0, None, st.sparse_keep, stencil=cfg.stencil, w_min=cfg.rule.w_min,
                                w_max=cfg.rule.w_max)
    ridge = RidgeDecoder(alpha=cfg.decoder_alpha).fit(task.features(w0, mask0, task.q_train, dims, st), task.a_train)
    return lambda Q: ridge.predict(task.features(w0, mask0, Q, dims, st))


def qa_summary(report: dict) -> list:
    """The report's BLEU lines (Markdown)."""
    q = report["quality"]
    names = ("lattice", "identity_lattice", "untrained_lattice_ridge", "copy_question", "constant_answer",
             "tfidf_retrieval", "answer_bank_oracle")
    rows = ["", f"corpus BLEU (sacrebleu definition, 0-100) on {q['pairs']['train']} training and "
                f"{q['pairs']['held_out']} held-out pairs:", "",
            "| | " + " | ".join(n.replace("_", " ") for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for split in ("train", "held_out"):
        vals = [q[split].get(n) for n in names]
        rows.append(f"| {split.replace('_', '-')} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in vals)
                    + " |")
    rows.append("")
    for st in report["stages"]:
        am = st.get("activation_memory")
        if am:
            rows.append(f"{st['name']}: activation memory of one step (B={am['batch']}, T={am['steps']}, "
                        f"{am['weights']} weights): {am['without_checkpointing_bytes'] / 2**20:.2f} MiB without "
                        f"checkpointing, {am['with_checkpointing_bytes'] / 2**20:.2f} MiB with checkpoint_every="
                        f"{am['checkpoint_every']} ({am['method']})")
    rows.append(f"monitor overhead {100 * report['monitor_overhead']:.1f}% of training time")
    return rows
