#!/usr/bin/env python
"""Run the soundness suite under a hypothesis profile and print the outcome table.

    python tests/soundness/run_soak.py                      # soak profile: thousands of cases
    python tests/soundness/run_soak.py --profile soundness  # the quick, reproducible default
    python tests/soundness/run_soak.py --examples 1000 -k programs
    python tests/soundness/run_soak.py --profile soundness --examples 60 --inner inductor
    python tests/soundness/run_soak.py --profile soundness --examples 200 --inner inductor --reference compile

Prints the table of outcomes per test (rewritten-equal / refused / left-alone / silent-wrong /
near-miss-rewritten / unreported / crashed), ready to paste into bench/RESULTS.md, then the
failure groups. Everything (counts.md, counts.json, failures.md with a reproducer per group)
is left in --out (default: a new temporary directory). Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="soak", help="hypothesis profile (soak, soundness, ...)")
    parser.add_argument("--examples", type=int, help="override the profile's max_examples")
    parser.add_argument("--out", help="directory for counts.md, counts.json, failures.md")
    parser.add_argument("--inner", choices=("eager", "inductor"), default="eager",
                        help="what runs the rewritten graphs (attnopt's inner): the default, or Inductor")
    parser.add_argument("--reference", choices=("eager", "compile"), default="eager",
                        help="what the rewrite must equal: the original called eagerly (default), or plain "
                             "torch.compile(original) (with --inner inductor: the torch.compile backend's default)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (programs, near_misses, gradients, instances)")
    options, extra = parser.parse_known_args()
    out = Path(options.out or tempfile.mkdtemp(prefix="attnopt-soundness-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ATTNOPT_SOUNDNESS_DIR=str(out))
    if options.examples:
        env["ATTNOPT_SOUNDNESS_EXAMPLES"] = str(options.examples)
    env["ATTNOPT_SOUNDNESS_INNER"] = options.inner
    env["ATTNOPT_SOUNDNESS_REFERENCE"] = options.reference
    command = [sys.executable, "-m", "pytest", "tests/soundness", f"--hypothesis-profile={options.profile}",
               "-q", "--tb=no", "-p", "no:cacheprovider"]
    if options.keyword:
        command += ["-k", options.keyword]
    command += extra
    status = subprocess.call(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    counts, failures = out / "counts.md", out / "failures.md"
    if not counts.exists():
        print(f"no cases ran (pytest exit status {status})", file=sys.stderr)
        return status or 1
    print(f"profile: {options.profile}" + (f", max_examples={options.examples}" if options.examples else "")
          + f", inner={options.inner}, reference={options.reference}")
    print(counts.read_text())
    if failures.exists():
        groups = re.findall(r"^## (.*)$", failures.read_text(), flags=re.M)
        if groups:
            print(f"{len(groups)} failure group(s):")
            for group in groups:
                print(f"  {group}")
    print(f"\ndetails and reproducers: {out}/failures.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
