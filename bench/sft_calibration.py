"""Calibrate the CPU demo task: SFT a tiny Qwen2 on the synthetic traces, score held-out problems.

Builds the demo corpus and tokenizer in memory (megatron_t1.data.synthetic / tokenizer), packs it
(megatron_t1.data.packing), trains a ``transformers`` Qwen2ForCausalLM built from a config with
plain ``torch.optim.AdamW`` (fp32, token-mean loss over trained tokens, block-diagonal causal
mask), then decodes held-out problems greedily and with temperature sampling and scores the
``\\boxed{}`` answer by exact integer match.

Target (see bench/RESULTS.md): greedy held-out accuracy ~40-55% after <= 3.5 min on 2 threads,
pass@k from sampling clearly higher (headroom for RL).

    python bench/sft_calibration.py                   # the default (demo) setting
    python bench/sft_calibration.py --digits 1 3 --operands 3 3 --steps 400 --hidden 256
"""

from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_t1.data import synthetic  # noqa: E402
from megatron_t1.data.packing import micro_batches, pack_sequences  # noqa: E402
from megatron_t1.data.sft import tokenize_chat  # noqa: E402
from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer  # noqa: E402


def build_model(vocab: int, args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn or 3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 1024),
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(cfg)


def train(model, rows, args) -> dict:
    """AdamW, linear warmup then cosine to 10%, token-mean cross entropy over trained tokens."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        ),
    )
    rng = random.Random(args.seed)
    model.train()
    t0, step, tokens, log = time.time(), 0, 0, []
    while step < args.steps:
        order = list(range(len(rows)))
        rng.shuffle(order)
        epoch_rows = [rows[i] for i in order]
        for batch in micro_batches(epoch_rows, args.batch, drop_last=True, layout="mask"):
            batch = {k: v.to(args.device) for k, v in batch.items()}
            out = model(
                input_ids=batch["tokens"],
                position_ids=batch["position_ids"],
                attention_mask=~batch["attention_mask"],
            )
            ce = torch.nn.functional.cross_entropy(
                out.logits.flatten(0, 1).float(),
                batch["labels"].flatten(),
                reduction="none",
                ignore_index=-100,
            )
            loss = (ce * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += batch["tokens"].numel()
            if step % 50 == 0 or step == args.steps:
                el = time.time() - t0
                log.append((step, loss.item(), el))
                print(
                    f"  step {step:5d}  loss {loss.item():.4f}  {el:6.1f}s  {tokens / el:7.0f} tok/s",
                    flush=True,
                )
            if step >= args.steps or 0 < args.time_budget < time.time() - t0:
                return {
                    "steps": step,
                    "wall_s": time.time() - t0,
                    "tokens": tokens,
                    "final_loss": loss.item(),
                }
    return {"steps": step, "wall_s": time.time() - t0, "tokens": tokens, "final_loss": log[-1][1]}


@torch.no_grad()
def evaluate(model, tok, problems, *, n_samples: int, temperature: float, max_new: int, bs: int) -> dict:
    """Greedy accuracy, sampled mean accuracy and pass@n_samples over ``problems``."""
    model.eval()
    tok.padding_side = "left"
    prompts = [
        tok.apply_chat_template(
            synthetic.prompt_messages(p.question), tokenize=False, add_generation_prompt=True
        )
        for p in problems
    ]
    gen_kw = dict(max_new_tokens=max_new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def run(do_sample: bool, n: int) -> list[list[str]]:
        outs: list[list[str]] = []
        for i in range(0, len(prompts), bs):
            enc = tok(prompts[i : i + bs], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            kw = (
                dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                if do_sample
                else dict(do_sample=False)
            )
            g = model.generate(**enc, num_return_sequences=n, **kw, **gen_kw)
            texts = tok.batch_decode(g[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outs += [texts[j * n : (j + 1) * n] for j in range(len(texts) // n)]
        return outs

    t0 = time.time()
    greedy = run(False, 1)
    t_greedy = time.time() - t0
    greedy_ok = [synthetic.is_correct(g[0], p.answer) for g, p in zip(greedy, problems)]
    res = {"greedy": statistics.mean(greedy_ok), "greedy_s": t_greedy, "example": greedy[0][0]}
    lens = [len(tok(g[0], add_special_tokens=False)["input_ids"]) for g in greedy]
    res["greedy_len"] = statistics.mean(lens)
    res["no_box"] = statistics.mean(synthetic.last_boxed(g[0]) is None for g in greedy)
    res.update(line_stats([g[0] for g in greedy]))
    if n_samples:
        torch.manual_seed(0)
        t0 = time.time()
        samples = run(True, n_samples)
        ok = [[synthetic.is_correct(s, p.answer) for s in ss] for ss, p in zip(samples, problems)]
        res["sample_mean"] = statistics.mean(statistics.mean(o) for o in ok)
        res[f"pass@{n_samples}"] = statistics.mean(any(o) for o in ok)
        res["frac_mixed"] = statistics.mean(0 < sum(o) < len(o) for o in ok)
        res["sample_s"] = time.time() - t0
    return res


_LINE = re.compile(r"^(check: )?(\d+) ([+-]) (\d+) = (\d+)(, correct|, not \d+, wrong)?$")


def line_stats(texts: list[str]) -> dict:
    """Diagnostics of generated traces: arithmetic truth of attempt lines and of 'correct' checks."""
    att = att_ok = chk = chk_ok = 0
    for text in texts:
        for line in text.splitlines():
            m = _LINE.match(line.strip())
            if not m:
                continue
            a, op, b, r = int(m[2]), m[3], int(m[4]), int(m[5])
            true = (a + b if op == "+" else a - b) == r
            if m[1]:
                chk += 1
                chk_ok += true
            else:
                att += 1
                att_ok += true
    return {"attempt_true": att_ok / max(att, 1), "check_true": chk_ok / max(chk, 1)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = ap.add_argument_group("task (defaults = megatron_t1.data.synthetic defaults)")
    task.add_argument("--operands", type=int, nargs=2, default=(3, 5))
    task.add_argument("--digits", type=int, nargs=2, default=(1, 1))
    task.add_argument("--error-rate", type=float, default=0.25)
    task.add_argument("--plain", action="store_true", help="no 'now:' restatement lines")
    task.add_argument("--truncated-fraction", type=float, default=0.1)
    task.add_argument("--n-train", type=int, default=12000)
    task.add_argument("--n-heldout", type=int, default=500)
    task.add_argument("--vocab-size", type=int, default=512)
    model = ap.add_argument_group("model and training")
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--hidden", type=int, default=128)
    model.add_argument("--ffn", type=int, default=0, help="MLP width (default 3 x hidden)")
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--seq-len", type=int, default=512)
    model.add_argument("--batch", type=int, default=2, help="packed rows per optimizer step")
    model.add_argument("--lr", type=float, default=1e-3)
    model.add_argument("--steps", type=int, default=1800)
    model.add_argument("--time-budget", type=float, default=0.0, help="stop training after N s (0: never)")
    model.add_argument("--threads", type=int, default=2)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument(
        "--device", default="cpu", help="cpu (the target) or cuda (fast sweeps of equal steps)"
    )
    ev = ap.add_argument_group("evaluation")
    ev.add_argument("--samples", type=int, default=4, help="samples per problem (pass@k, sampled mean)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--max-new", type=int, default=256)
    ev.add_argument("--eval-bs", type=int, default=100)
    ev.add_argument("--train-only", action="store_true", help="measure training speed, skip the evaluation")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    diff = dict(n_operands=tuple(args.operands), digits=tuple(args.digits))

    t0 = time.time()
    examples = synthetic.make_sft_examples(
        args.n_train,
        args.seed,
        truncated_fraction=args.truncated_fraction,
        error_rate=args.error_rate,
        restate=not args.plain,
        **diff,
    )
    tok = train_tokenizer(chat_corpus(examples), args.vocab_size)
    tokenized = [tokenize_chat(e, tok, None) for e in examples]
    rows = pack_sequences(tokenized, args.seq_len, tok.pad_token_id)
    heldout = synthetic.make_problems(args.n_heldout, args.seed, "heldout", **diff)
    n_tok = sum(len(t.input_ids) for t in tokenized)
    n_loss = sum(sum(t.loss_mask) for t in tokenized)
    print(
        f"data: {len(examples)} examples, {n_tok} tokens ({n_loss} trained), "
        f"{n_tok / len(examples):.1f} tok/ex, "
        f"{len(rows)} rows of {args.seq_len} (fill {n_tok / (len(rows) * args.seq_len):.2f}), "
        f"vocab {len(tok)}, built in {time.time() - t0:.1f}s"
    )
    model = build_model(len(tok), args).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    shape = f"{args.layers}x{args.hidden}"
    print(f"model: {shape}, {args.heads} heads, {n_params / 1e6:.2f}M params; torch threads {args.threads}")
    tr = train(model, rows, args)
    epochs = tr["steps"] * args.batch / len(rows)
    tok_s = tr["tokens"] / tr["wall_s"]
    print(f"train: {tr['steps']} steps ({epochs:.2f} epochs), {tr['wall_s']:.0f}s, {tok_s:.0f} tok/s")
    if args.train_only:
        return
    ev = evaluate(
        model,
        tok,
        heldout,
        n_samples=args.samples,
        temperature=args.temperature,
        max_new=args.max_new,
        bs=args.eval_bs,
    )
    se = math.sqrt(ev["greedy"] * (1 - ev["greedy"]) / len(heldout))
    k = args.samples
    print(f"example greedy output:\n{ev['example']}\n")
    print(
        "| task | model | steps | epochs | tok/s | train s | loss | greedy (+-SE) "
        f"| sampled T={args.temperature} "
        f"| pass@{k} | mixed groups | greedy len |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| ops {tuple(args.operands)} digits {tuple(args.digits)} err {args.error_rate}"
        f"{' plain' if args.plain else ''} seed {args.seed} | {shape} {n_params / 1e6:.2f}M "
        f"| {tr['steps']} | {epochs:.2f} | {tok_s:.0f} | {tr['wall_s']:.0f} | {tr['final_loss']:.3f} "
        f"| {ev['greedy']:.3f} ({se:.3f}) | {ev.get('sample_mean', float('nan')):.3f} "
        f"| {ev.get(f'pass@{k}', float('nan')):.3f} | {ev.get('frac_mixed', float('nan')):.2f} "
        f"| {ev['greedy_len']:.0f} |"
    )
    print(
        f"lines in greedy traces: attempts true {ev['attempt_true']:.3f}, checks true {ev['check_true']:.3f}"
    )
    print(
        f"eval: greedy {ev['greedy_s']:.0f}s, sampling {ev.get('sample_s', 0):.0f}s, "
        f"no box {ev['no_box']:.3f}"
    )


if __name__ == "__main__":
    main()
