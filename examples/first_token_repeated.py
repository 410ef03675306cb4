"""Reproduce the synthetic experiment of Du et al. (ACL 2023) with exact top paths.

    python examples/first_token_repeated.py            # full: 10,000 examples, ~10 s training on 2 CPU cores
    python examples/first_token_repeated.py --quick    # 2,000 examples, seconds

Trains (or loads from the cache) a 1-layer BERT on FirstTokenRepeatedOnce,
back-propagates the gold-class logit of held-out positive examples with the
maxabs semiring and prints the mean top-path weight through query, key,
value and skip at the attention input for the first token, the repeated
token and the other tokens, beside the paper's numbers.
"""

import argparse
import json

from semitriton.experiments import first_token as task
from semitriton.experiments.first_token_paths import branch_means, format_table


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced setting used by the tests")
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out positive examples to analyse")
    ap.add_argument("--semiring", default="maxabs", choices=["maxabs", "max"])
    ap.add_argument("--at", default="inputs", choices=["inputs", "residual"],
                    help="paths from each token's input embedding (default) or from the attention input")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    model, _, test, metrics = task.trained_model(cache_dir=args.cache_dir, quick=args.quick)
    print(f"model: held-out accuracy {metrics.get('eval_accuracy', float('nan')):.3f} "
          f"after {metrics.get('epochs')} epochs{' (cached)' if metrics.get('cached') else ''}")
    res = branch_means(model, test, n=args.n_eval, semiring=args.semiring, progress=True, at=args.at)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
