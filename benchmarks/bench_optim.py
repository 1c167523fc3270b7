"""Optimizer benchmark: one step of SGD (momentum) and AdamW over parameter
sets shaped like real models, and the regularized case "AdamW + L1 +
gradient clipping".

Parameter sets: "resnet50" (the 161 tensors of ResNet-50, 25.6M parameters;
`--width` scales the channels, the CPU default is full width) and
"transformer" (a GPT-like stack, 125M parameters in 148 tensors on a GPU; on
the CPU 1/4 of the width, about 8M parameters, so the run takes about a
minute).

Providers: regops (the backends this machine offers), torch for-loop
(foreach=False), foreach and fused. "adamw+ema" is AdamW with an
exponential moving average of the weights updated in the same fused pass
(ema_decay), against torch's fused and foreach AdamW each followed by
torch._foreach_lerp_ of the averages (torch-way-fused, torch-way-foreach).
"adamw+sr" (16-bit only) is regops' AdamW with stochastic rounding against
the same step rounded to nearest (regops-<backend>-nearest) and torch fused.
The regularized case compares
regops.optim.AdamW(l1=..., max_grad_norm=...) with the torch way of getting
the same update: clip_grad_norm_ (regops clips the loss gradient; penalties
come after, like weight decay), the L1 subgradient added with foreach ops,
then the fastest torch AdamW (fused).

Bytes per parameter, the same minimal formula for every provider (element
size e, states in the parameter's dtype): SGD with momentum reads p, g, buf
and writes p, buf: 5e; AdamW reads p, g, m, v and writes p, m, v: 7e; the
regularized case adds one read of g for the norm: 8e; the average adds a
read and a write of it: 9e.

Every provider is checked against torch's for-loop step (or, for the
regularized case, the torch way) before it is timed.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Row, argument_parser, copy_bandwidth, emit, fill_ratios, time_fn

import regops

TORCH_PROVIDERS = ("torch-forloop", "torch-foreach", "torch-fused", "torch-way", "torch-way-fused",
                   "torch-way-foreach")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
L1, MAX_NORM = 1e-5, 1.0
BYTES_PER_PARAM = {"sgd": 5, "adamw": 7, "adamw+l1+clip": 8, "adamw+ema": 9, "adamw+sr": 7}  # times the element size
EMA_DECAY = 0.999
CASES = ("sgd", "adamw", "adamw+l1+clip", "adamw+ema", "adamw+sr")


def resnet50_shapes(width: float = 1.0) -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's resnet50 (161 tensors), channels scaled by width."""
    def c(channels):
        return max(1, int(channels * width))

    shapes = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    in_channels = c(64)
    for blocks, planes in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for block in range(blocks):
            w, out = c(planes), c(planes * 4)
            shapes += [(w, in_channels, 1, 1), (w,), (w,), (w, w, 3, 3), (w,), (w,), (out, w, 1, 1), (out,), (out,)]
            if block == 0:
                shapes += [(out, in_channels, 1, 1), (out,), (out,)]
            in_channels = out
    return shapes + [(1000, in_channels), (1000,)]


def transformer_shapes(width: float = 1.0, layers: int = 12, vocab: int = 50304, context: int = 1024):
    """A GPT-2-small-like stack (125M parameters at width 1): embeddings, and
    per layer two layer norms, attention and MLP weights with biases."""
    d = int(768 * width)
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def _make(shapes, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).mul_(0.02).to(device, dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3).to(device, dtype)
    return params


def _clone(params):
    copies = [p.detach().clone().requires_grad_() for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    return copies


def _regops_backends(device: torch.device) -> list[str]:
    available = regops.available_backends()
    return [b for b in ("cuda", "triton") if b in available] if device.type == "cuda" else ["cpu"]


OPTIONS = {"sgd": dict(lr=0.01, momentum=0.9, weight_decay=1e-4), "adamw": dict(lr=1e-3, weight_decay=1e-2)}


def _providers(case: str, device: torch.device):
    """(provider, backend or None, make(params) -> step function)."""
    providers = []
    torch_class = torch.optim.SGD if case == "sgd" else torch.optim.AdamW
    if case in ("sgd", "adamw"):
        regops_class = regops.optim.SGD if case == "sgd" else regops.optim.AdamW
        for backend in _regops_backends(device):
            providers.append((f"regops-{backend}", backend, lambda ps, c=regops_class: c(ps, **OPTIONS[case]).step))
        for name, kwargs in (("torch-forloop", dict(foreach=False)), ("torch-foreach", dict(foreach=True)),
                             ("torch-fused", dict(fused=True))):
            providers.append((name, None, lambda ps, kw=kwargs: torch_class(ps, **OPTIONS[case], **kw).step))
        return providers
    if case == "adamw+ema":
        for backend in _regops_backends(device):
            providers.append((f"regops-{backend}", backend,
                              lambda ps: regops.optim.AdamW(ps, **OPTIONS["adamw"], ema_decay=EMA_DECAY).step))

        def torch_way_ema(kwargs):
            def make(ps):
                optimizer = torch.optim.AdamW(ps, **OPTIONS["adamw"], **kwargs)
                averages = [p.detach().clone() for p in ps]
                current = [p.detach() for p in ps]

                def step():
                    optimizer.step()
                    torch._foreach_lerp_(averages, current, 1 - EMA_DECAY)
                return step
            return make
        providers.append(("torch-way-fused", None, torch_way_ema(dict(fused=True))))
        providers.append(("torch-way-foreach", None, torch_way_ema(dict(foreach=True))))
        return providers
    if case == "adamw+sr":
        for backend in _regops_backends(device):
            providers.append((f"regops-{backend}-sr", backend,
                              lambda ps: regops.optim.AdamW(ps, **OPTIONS["adamw"], stochastic_rounding=True).step))
            providers.append((f"regops-{backend}-nearest", backend,
                              lambda ps: regops.optim.AdamW(ps, **OPTIONS["adamw"]).step))
        providers.append(("torch-fused", None, lambda ps: torch.optim.AdamW(ps, **OPTIONS["adamw"], fused=True).step))
        return providers
    for backend in _regops_backends(device):
        providers.append((f"regops-{backend}", backend,
                          lambda ps: regops.optim.AdamW(ps, **OPTIONS["adamw"], l1=L1, max_grad_norm=MAX_NORM).step))

    def torch_way(ps):
        optimizer = torch.optim.AdamW(ps, **OPTIONS["adamw"], fused=True)
        grads = [p.grad for p in ps]

        def step():
            torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=True)
            torch._foreach_add_(grads, torch._foreach_sign([p.detach() for p in ps]), alpha=L1)
            optimizer.step()
        return step
    providers.append(("torch-way", None, torch_way))
    return providers


def _reference_result(case, params):
    """One step of the oracle on copies: torch's for-loop optimizer, or the torch way."""
    copies = _clone(params)
    if case == "sgd":
        torch.optim.SGD(copies, **OPTIONS["sgd"], foreach=False).step()
    elif case in ("adamw", "adamw+ema", "adamw+sr"):  # the parameters after one step; the average is checked apart
        torch.optim.AdamW(copies, **OPTIONS["adamw"], foreach=False).step()
    else:
        with torch.no_grad():
            # The clip coefficient from a float64 norm: the oracle should not
            # inherit float32 accumulation error over 25M terms.
            norm = torch.sqrt(sum(p.grad.double().square().sum() for p in copies))
            coef = torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0).float()
            for p in copies:
                p.grad.mul_(coef).add_(torch.sign(p), alpha=L1)
        torch.optim.AdamW(copies, **OPTIONS["adamw"], foreach=False).step()
    return [c.detach() for c in copies]


def _check(provider, case, step, params, expected, dtype):
    """One step must match the oracle. In the regularized case a few
    elements may not: where the clipped gradient and l1 * sign(p) nearly
    cancel, Adam's normalized step amplifies a last-bit difference of the
    norm (torch's float32 norm of 25M terms is off by ~1e-5 relative)."""
    step()
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    allowed = 1e-4 if case == "adamw+l1+clip" else 0.0
    bad = total = 0
    for p, e in zip(params, expected):
        actual, wanted = p.detach().float(), e.float()
        bad += int(((actual - wanted).abs() > atol + rtol * wanted.abs()).sum())
        total += actual.numel()
    if bad > allowed * total:
        raise AssertionError(f"{provider}: one step of {case} differs from the reference in {bad} of {total} elements")


def _check_average(provider, step_owner, params):
    """After regops' first step the EMA is the parameters (AveragedModel's copy)."""
    optimizer = getattr(step_owner, "__self__", None)
    if optimizer is None:
        return
    for p in params:
        if not torch.equal(optimizer.state[p]["ema"], p.detach()):
            raise AssertionError(f"{provider}: the average after the first step is not the parameters")


def run(device, sets: dict[str, list[tuple[int, ...]]], dtypes: list[str], cases=CASES, rounds: int = 1):
    """One row per (set, dtype, case, provider). With ``rounds`` > 1 the
    providers of a case are kept side by side and timed in turn, ``rounds``
    times (interleaved, so that a slow phase of a shared machine hits them
    all); a row is the median of the rounds' medians, its note the spread."""
    device = torch.device(device)
    copy_gbps = copy_bandwidth(device)
    rows: list[Row] = []
    for set_name, shapes in sets.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        size = f"{set_name} {numel / 1e6:.1f}M/{len(shapes)}"
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            e = torch.finfo(dtype).bits // 8
            base = _make(shapes, device, dtype)
            for case in cases:
                if case == "adamw+sr" and dtype == torch.float32:
                    continue  # float32 parameters are not rounded
                expected = _reference_result(case, base)
                prepared = []
                for provider, backend, make in _providers(case, device):
                    params = _clone(base)
                    with regops.use_backend(backend):
                        step = make(params)
                        _check(provider, case, step, params, expected, dtype)
                        if case == "adamw+ema" and backend is not None:
                            _check_average(provider, step, params)
                    if rounds == 1:
                        with regops.use_backend(backend):
                            prepared.append((provider, backend, [time_fn(step, device)], None))
                        del params, step
                    else:
                        prepared.append((provider, backend, [], step))
                for _ in range(rounds if rounds > 1 else 0):
                    for provider, backend, samples, step in prepared:
                        with regops.use_backend(backend):
                            samples.append(time_fn(step, device))
                for provider, _, samples, _ in prepared:
                    note = f"{BYTES_PER_PARAM[case] * e} B/param"
                    if rounds > 1:
                        note += f", {rounds} interleaved rounds: {min(samples):.3f}-{max(samples):.3f} ms"
                        print(f"{case} {size} {dtype_name} {provider}: median {statistics.median(samples):.3f} ms, "
                              f"rounds {', '.join(f'{t:.3f}' for t in samples)}")
                    rows.append(Row("optim", case, size, dtype_name, provider, statistics.median(samples),
                                    BYTES_PER_PARAM[case] * e * numel, device=device.type,
                                    note=note).finish(copy_gbps))
                del prepared, expected
            del base
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fill_ratios(rows, TORCH_PROVIDERS)
    _report_rounding_cost(rows)
    return rows


def _report_rounding_cost(rows: list[Row]) -> None:
    """Stochastic rounding's cost: the -sr row's time over the -nearest row's."""
    nearest = {(r.size, r.dtype, r.provider[:-len("-nearest")]): r.ms for r in rows
               if r.case == "adamw+sr" and r.provider.endswith("-nearest")}
    for r in rows:
        if r.case == "adamw+sr" and r.provider.endswith("-sr"):
            base = nearest.get((r.size, r.dtype, r.provider[:-len("-sr")]))
            if base:
                r.note = f"{r.note}, {r.ms / base:.2f}x the time of rounding to nearest"
                print(f"stochastic rounding, {r.size} {r.dtype} {r.provider}: {r.ms:.3f} ms, "
                      f"{r.ms / base:.2f}x the {base:.3f} ms of rounding to nearest")


def default_sets(device: torch.device, quick: bool) -> dict:
    if quick:
        return {"resnet50/16": resnet50_shapes(1 / 16)}
    if device.type == "cuda":
        return {"resnet50": resnet50_shapes(), "transformer": transformer_shapes()}
    return {"resnet50": resnet50_shapes(), "transformer/4": transformer_shapes(0.25, vocab=12288, context=256)}


def suite(device: torch.device, quick: bool) -> list[Row]:
    """The default sweep, for benchmarks/run.py."""
    dtypes = ["float32"] if quick else ["float32", "bfloat16"]
    return run(device, default_sets(device, quick), dtypes)


def main(argv=None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sets", default=None, help="comma-separated: resnet50, transformer")
    parser.add_argument("--width", type=float, default=None, help="scale the channels of every set")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quick", action="store_true", help="tiny sets, to check the script runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results/")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the providers of a case in turn this many times (medians, spread in the note)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = default_sets(device, args.quick)
    if args.width is not None:
        sets = {f"resnet50x{args.width:g}": resnet50_shapes(args.width),
                f"transformerx{args.width:g}": transformer_shapes(args.width)}
    if args.sets:
        wanted = args.sets.split(",")
        sets = {k: v for k, v in sets.items() if k.split("/")[0].split("x")[0] in wanted}
    rows = run(device, sets, args.dtypes.split(","), cases=tuple(args.cases.split(",")), rounds=args.rounds)
    emit(rows, "optim", device, record=not args.no_record)
    print("\nbytes per parameter (e = element size): sgd 5e, adamw 7e, adamw+l1+clip 8e, adamw+ema 9e; "
          "'vs best torch' is the fastest torch provider's time over this row's")


if __name__ == "__main__":
    main()
