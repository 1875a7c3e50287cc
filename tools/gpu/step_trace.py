#!/usr/bin/env python3
"""step_trace.py: where a GPU step's time goes, per rank, from the workers' debug log lines.

Run the engine with MOE_LOG_LEVEL=debug (every worker then logs one "gpu step" line per step),
then:   step_trace.py LOG [LOG...]
A log holding several engines one after the other (bench_scaleout with several --dbo settings)
is split at each engine's config line: LOG#2, LOG#3, .. for the second, third, ..
For each world size found it prints, over the steps every rank logged: how far apart the ranks
entered the step (max - min of the entry times: the skew the x all-gather waits for), the share
of steps staged ahead, and the means of h2d, gather, step and host times, with the p50/p90/max
of the skew, and the median host time of a step split in its parts. Then, for W > 1 and each
step size, every rank's median timeline of its micro-batches (two with DBO, one without; with
--combine-parts the first part and the last), from the whole x on the device: products done,
exchange begun, rows packed, all-to-all done, exchange done (us), and its median step (us, to the
rows copied out). Standard library only.
"""
import re
import statistics
import sys

LINE = re.compile(r"worker r(\d+) p(\d+)\] gpu step (\d+): (\d+) tokens, entered at ([0-9.]+) s, left after ([0-9.]+) us; "
                  r"inputs (staged ahead|copied at entry) \(h2d ([0-9.]+) us\), x gather ([0-9.]+) us, step ([0-9.]+) us "
                  r"\(compute ([0-9.]+), combine ([0-9.]+)\), host ([0-9.]+) us"
                  r"(?: \(inputs ([0-9.]+), gather ([0-9.]+), products ([0-9.]+), plan ([0-9.]+), exchanges ([0-9.]+)\))?"
                  r"(?:; micro-batches at \([^)]*\) ((?:[0-9.]+ ){5}\| (?:[0-9.]+ ?){5}))?")


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else 0.0


def main(paths):
    runs = {}  # log (file, and engine start within it) -> step -> rank -> fields
    for path in paths:
        inst = 0
        with open(path, errors="replace") as f:
            for ln in f:
                if "eng[coord" in ln and "] config: " in ln:
                    inst += 1  # a new engine in the same log: its steps count from 1 again
                m = LINE.search(ln)
                if not m:
                    continue
                rank, pid, step = int(m.group(1)), int(m.group(2)), int(m.group(3))
                rec = dict(tokens=int(m.group(4)), entry=float(m.group(5)), left=float(m.group(6)),
                           staged=m.group(7) == "staged ahead", h2d=float(m.group(8)), gather=float(m.group(9)),
                           step=float(m.group(10)), host=float(m.group(13)),
                           split=[float(m.group(i)) for i in range(14, 19)] if m.group(14) else None,
                           mb=[float(v) for v in m.group(19).replace("|", " ").split()] if m.group(19) else None)
                label = path if inst <= 1 else "%s#%d" % (path, inst)
                runs.setdefault(label, {}).setdefault(step, {})[rank] = rec
    if not runs:
        print("step_trace: no 'gpu step' lines (run the engine with MOE_LOG_LEVEL=debug)")
        return 1
    print("%-28s %5s %6s %7s %8s %8s %8s %8s %8s %8s %8s %8s %8s  %s" % (
        "log", "W", "steps", "staged", "skew us", "p50", "p90", "max", "h2d us", "gather", "step us", "left us",
        "host us", "host split p50: inputs, gather, products, plan, exchanges"))
    for path, steps in runs.items():
        by_w = {}
        for sid, ranks in steps.items():
            by_w.setdefault(max(ranks) + 1, []).append(ranks)
        for w, lst in sorted(by_w.items()):
            full = [r for r in lst if len(r) == w]
            if not full:
                continue
            skew = [1e6 * (max(x["entry"] for x in r.values()) - min(x["entry"] for x in r.values())) for r in full]
            allr = [x for r in full for x in r.values()]
            sp = [x["split"] for x in allr if x["split"]]
            split = " ".join("%.0f" % pct([v[i] for v in sp], 0.5) for i in range(5)) if sp else "-"
            print("%-28s %5d %6d %6.0f%% %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f  %s" % (
                path[-28:], w, len(full), 100.0 * sum(x["staged"] for x in allr) / len(allr), statistics.mean(skew),
                pct(skew, 0.5), pct(skew, 0.9), max(skew), statistics.mean(x["h2d"] for x in allr),
                statistics.mean(x["gather"] for x in allr), statistics.mean(x["step"] for x in allr),
                statistics.mean(x["left"] for x in allr), pct([x["host"] for x in allr], 0.5), split))
    print("\nmicro-batch timelines (median over steps, us from the whole x on the device): products done, "
          "exchange begun, packed, all-to-all done, exchange done; mb1: the last part; step: to the rows copied out")
    for path, steps in runs.items():
        groups = {}  # (W, tokens, rank) -> [mb lists]
        for sid, ranks in steps.items():
            w = max(ranks) + 1
            if w < 2 or len(ranks) != w:
                continue
            for rk, x in ranks.items():
                if x["mb"]:
                    groups.setdefault((w, x["tokens"], rk), []).append(x["mb"] + [x["step"]])
        for (w, t, rk), lst in sorted(groups.items()):
            med = [pct([v[i] for v in lst], 0.5) for i in range(11)]
            two = any(v[5] > 0 for v in lst)
            print("%-28s W %d T %6d rank %d (%3d steps): mb0 %s%s  | step %6.0f" % (
                path[-28:], w, t, rk, len(lst), " ".join("%6.0f" % v for v in med[:5]),
                ("  | mb1 " + " ".join("%6.0f" % v for v in med[5:10])) if two else "", med[10]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) if len(sys.argv) > 1 else (print(__doc__) or 2))
