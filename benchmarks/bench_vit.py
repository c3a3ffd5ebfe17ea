"""Benchmark the FG-VCE search on a ViT-B/16-shaped model (issue 6): head evaluations per
explanation and explanations per second.

torchvision ``vit_b_16(weights=None)`` (random weights, nothing downloaded) at 224×224 is split by
:func:`~fgvce_lightning.engine.split.split_model`: features = patch tokens after encoder block
11/12 on the 14×14 patch grid plus the class token as 768 protected prefix channels
(``F: (N, 1536, 14, 14)``); head = block 12 + final norm + class token → classifier. The classifier
has ``--num-classes`` outputs (default 200, CUB-sized: the bank is ``classes × per-class`` maps of
1.1 MB each) and random weights (torchvision initialises it to zero, which makes every logit equal).

No training: the labels are planted. Each query is a random smooth image whose *true* class is set
to the head's second most likely class, so the query is a "mistake" (``pred`` = argmax). The
reference bank holds, for every query's true class, the ``--bank-per-class`` pool images with the
largest margin for that class (the most "true-class-like" ones), labelled with it.

    python benchmarks/bench_vit.py                          # CPU defaults: finishes in < 3 min on 2 cores
    python benchmarks/bench_vit.py --device cuda --queries 32 --bank-per-class 16 --chunk-size 256
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F
from torchvision.models import vit_b_16

from fgvce_lightning.engine.bank import ReferenceBank
from fgvce_lightning.engine.search import SearchConfig, counterfactual_search
from fgvce_lightning.engine.split import split_model


def smooth_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3, size, size)`` random images with structure at several scales (not white noise)."""
    out = torch.zeros(n, 3, size, size)
    for cells, weight in ((4, 1.0), (16, 0.5), (56, 0.25)):
        coarse = torch.randn(n, 3, cells, cells, generator=generator)
        out += weight * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return out


@torch.no_grad()
def _features(split, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for i in range(0, len(images), batch):
        f = split.features(images[i:i + batch])
        feats.append(f)
        logits.append(split.head(f))
    return torch.cat(feats), torch.cat(logits)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=4, help="mistakes to explain")
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--pool", type=int, default=16, help="random images the references are picked from")
    parser.add_argument("--bank-per-class", type=int, default=4, help="references per true class")
    parser.add_argument("--chunk-size", type=int, default=32,
                        help="feature maps per head call (memory ~ 6 MB per map on the CPU, float32)")
    parser.add_argument("--num-samples", type=int, default=2, help="Shapley permutations per cell")
    parser.add_argument("--references", type=int, default=8, help="SearchConfig.num_references")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    model = vit_b_16(weights=None, num_classes=args.num_classes).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)
    model = model.to(device)
    split = split_model(model)
    print(f"split: {split.description}")
    g = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    q_feats, q_logits = _features(split, smooth_images(args.queries, 224, g).to(device), 8)
    p_feats, p_logits = _features(split, smooth_images(args.pool, 224, g).to(device), 8)
    top2 = q_logits.topk(2, dim=1).indices
    pred, true = top2[:, 0], top2[:, 1]                 # planted: true = second most likely class
    classes = true.unique()
    bank = ReferenceBank(args.num_classes, args.bank_per_class, tuple(q_feats.shape[1:]), device=device,
                         dtype=torch.float16)
    for c in classes.tolist():                          # the pool images most like class c
        others = p_logits.clone()
        others[:, c] = float("-inf")
        margin = p_logits[:, c] - others.max(dim=1).values
        pick = margin.topk(min(args.bank_per_class, args.pool)).indices
        bank.add(p_feats[pick], torch.full((len(pick),), c, device=device))
    prep_s = time.perf_counter() - t0
    print(f"distinct (true, pred) pairs among the queries: {len(set(zip(true.tolist(), pred.tolist())))}; "
          f"query margins logit_pred - logit_true: {[round(v, 3) for v in (q_logits.gather(1, top2) @ torch.tensor([1.0, -1.0], device=device)).tolist()]}")
    print(f"features: {tuple(q_feats.shape)} ({q_feats[0].numel() * 4 / 2 ** 20:.1f} MB per map), "
          f"prefix (protected) channels {split.prefix_channels}; bank {len(bank)} maps for "
          f"{len(classes)} classes ({bank.memory_bytes / 2 ** 20:.0f} MB); prepared in {prep_s:.1f} s")

    config = SearchConfig(chunk_size=args.chunk_size, num_samples=args.num_samples,
                          num_references=args.references, protected_channels=split.prefix_channels,
                          seed=args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    explanations = counterfactual_search(split.head, q_feats, true, pred, bank, config, modules=(model,))
    if device.type == "cuda":
        torch.cuda.synchronize()
    search_s = time.perf_counter() - t1

    explained = [e for e in explanations if e.skipped_reason is None]
    evals = [e.head_evaluations for e in explained]
    result = {
        "queries": len(explanations), "explained": len(explained),
        "flipped": sum(e.success for e in explained),
        "mean_edits": sum(len(e.edits) for e in explained) / max(1, len(explained)),
        "head_evals_per_explanation": sum(evals) / max(1, len(evals)),
        "search_s": search_s, "explanations_per_s": len(explained) / search_s if search_s > 0 else 0.0,
        "config": dataclasses.asdict(config),
    }
    for e in explanations:
        status = e.skipped_reason or (f"flipped to {e.final_pred} with {len(e.edits)} edit(s)" if e.success
                                      else f"not flipped ({len(e.edits)} edits)")
        print(f"  query {e.query_index}: true {e.true} pred {e.pred}: {status}; "
              f"{e.head_evaluations} head evaluations")
    print(f"ViT-B/16 head (1 block + norm + classifier), 14x14 grid, chunk_size={args.chunk_size}, "
          f"num_samples={args.num_samples}, references={args.references}, device={device}, "
          f"threads={torch.get_num_threads()}")
    print(f"head evaluations / explanation: {result['head_evals_per_explanation']:.0f}")
    print(f"search time: {search_s:.1f} s for {len(explained)} explanations -> "
          f"{result['explanations_per_s']:.4f} explanations/s "
          f"({search_s / max(1, len(explained)):.1f} s each); flipped {result['flipped']}/{len(explained)}, "
          f"mean edits {result['mean_edits']:.1f}")
    return result


if __name__ == "__main__":
    main()
