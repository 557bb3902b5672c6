"""``gradpipe make-data``: deterministic synthetic data with a known truth (see ``pipeline.synth``)."""

from __future__ import annotations

import argparse
import json

from pipeline.synth import FORMATS, KINDS


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("make-data", parents=[parent], help="generate synthetic data with a known truth",
                       description="Write DIR/part-00000.<fmt>… and DIR/truth.json (true coefficients). "
                                   "Features get very different scales and means, so standardization "
                                   "matters. The same arguments always give byte-identical files. DIR is "
                                   "replaced atomically, and only if it is empty or a previous make-data "
                                   "output.")
    p.add_argument("--kind", choices=KINDS, required=True,
                   help="linear: y = X·coef + b + noise; logistic: y ~ Bernoulli(sigmoid(X·coef + b)); poisson, "
                        "gamma (shape 2), tweedie (compound Poisson–Gamma, dispersion 1): log link, "
                        "mean exp(X·coef + b [+ log_exposure])")
    p.add_argument("--power", type=float, metavar="P",
                   help="Tweedie power, strictly between 1 and 2 (--kind tweedie only; default 1.5)")
    p.add_argument("--weights", action="store_true",
                   help="add a column w ~ U(0.5, 2): a precision weight, Var(y) = φ·V(μ)/w (for poisson, "
                        "y = Poisson(w·μ)/w with w the exposure)")
    p.add_argument("--offset", action="store_true",
                   help="add a column log_exposure = log(U(0.5, 2)) that enters the linear predictor")
    p.add_argument("--rows", type=int, required=True, help="total data rows, split evenly across files")
    p.add_argument("--features", type=int, required=True, help="number of features x0..x{D-1}")
    p.add_argument("--files", type=int, default=1, help="number of part files (default 1)")
    p.add_argument("--format", choices=FORMATS, default="csv",
                   help="csv, parquet (float32 columns) or npy (2-D float64, target last; default csv)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--noise", type=float, default=0.1, help="std of the linear noise (default 0.1)")
    p.add_argument("--scale-spread", type=float, default=10.0, metavar="F",
                   help="feature scales lie in [1/F, F], means in [-5F, 5F] (default 10)")
    p.add_argument("--threads", type=int,
                   help="files written at once (default: min(files, cores)); never changes the output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.synth import SynthSpec, make_data

    spec = SynthSpec(kind=args.kind, rows=args.rows, features=args.features, files=args.files,
                     format=args.format, seed=args.seed, noise=args.noise, scale_spread=args.scale_spread,
                     power=args.power, weights=args.weights, offset=args.offset)
    result = make_data(spec, args.out, threads=args.threads)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.out}: wrote {result.files} {spec.format} file(s), {result.rows} rows × "
              f"{result.features} features ({result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s); "
              f"true coefficients in truth.json.")
    return 0
