"""Summarizes ncu's SASS source page (`ncu -i R --page source --csv --print-source sass`):
warp stall samples by opcode, and the instructions with the most samples, with the stall
reasons ncu attributes to them. Used by run_ncu_fwd_device.sh."""

import collections
import csv
import sys


def main(path: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if any("Source" == c for c in r))
    head, body = rows[start], [r for r in rows[start + 1 :] if len(r) == len(rows[start])]
    col = {name: i for i, name in enumerate(head)}
    total_name = next(n for n in head if n.startswith("Warp Stall Sampling (All"))
    reasons = [n for n in head if n.startswith("stall_") or n.startswith("smsp__pcsamp_warps_issue_stalled")]

    def num(r, name):
        try:
            return float(r[col[name]].replace(",", ""))
        except (ValueError, KeyError):
            return 0.0

    total = sum(num(r, total_name) for r in body) or 1.0
    print(f"columns: {head}\n")
    by_op = collections.Counter()
    for r in body:
        op = r[col["Source"]].strip().split(" ")[0].lstrip("@!P0123456789UT ").split(".")[0]
        by_op[op] += num(r, total_name)
    print(f"samples {total:.0f}; by opcode (share of all samples):")
    for op, n in by_op.most_common(25):
        print(f"  {op:<12} {100 * n / total:5.1f}%")
    print("\ntop instructions:")
    for r in sorted(body, key=lambda r: -num(r, total_name))[:45]:
        why = sorted(((num(r, n), n) for n in reasons), reverse=True)[:3]
        why_s = ", ".join(f"{n.replace('smsp__pcsamp_warps_issue_stalled_', '')} {v:.0f}" for v, n in why if v > 0)
        print(f"  {100 * num(r, total_name) / total:5.2f}%  {r[col.get('Address', 0)]}  {r[col['Source']].strip()[:70]:<70} {why_s}")


if __name__ == "__main__":
    main(sys.argv[1])
