"""The load test's report: CSV tables, an HTML summary and PNG plots from a run directory.

    .venv/bin/python -m loadtest.report RUN_DIR [--bin-s 10] [--out DIR] [--dpi 80]

Reads `requests.csv` (one row per request, written by loadtest/locustfile.py) and `run.json`,
and writes into the run directory (or `--out`):

- `summary.csv`: per tenant (by popularity rank) and overall: requests, share of requests against
  the Zipf probability, errors, 429s, tokens, TTFT/ITL/TPOT p50/p90/p99 (ms), output tokens/s;
- `timeseries.csv`: per `--bin-s` window, per tenant and overall: output tokens/s (by token
  arrival time), requests started, TTFT p50/p99 of the requests started in it, ITL p50/p99 of
  the tokens that arrived in it;
- `percentiles.png` (TTFT and ITL p50/p90/p99 per tenant and overall), `tokens_per_s.png`
  (tokens/s over time, stacked by tenant, with the shape's users or offered rate),
  `latency_over_time.png` (TTFT and ITL p50/p99 over time, overall and the top tenants),
  `tenant_share.png` (requests per tenant against the Zipf probabilities);
- `report.html`: parameters, the summary table and the plots.

Definitions: TTFT, from sending the request to the first SSE event that carries a completion
token; ITL, the gap between consecutive such events, divided among the tokens the later event
carries; TPOT, per request (last event - first event) / (tokens - 1); tokens/s, completion tokens
counted when they arrived. Failed requests count in `errors` and in no latency; requests cut
when Locust stopped the users at the end (`cancelled`) are no error, their tokens count.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
from collections import defaultdict
from pathlib import Path

from loadtest.workload import RequestRecord, Shape, read_records

OVERALL = "overall"
PCTS = (50, 90, 99)
TOP_TENANTS = 6  # tenants drawn on their own in the over-time plots; the rest are "others"


def _plain_log(ax, zero: bool = False) -> None:
    """A log y axis labelled 20, 50, 100 rather than 2x10^1; `zero`: linear below 1 (ms), so
    that ITLs of 0 (tokens that arrived together) stay on the plot."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    if zero:
        ax.set_yscale("symlog", linthresh=1.0, linscale=0.3)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def percentile(values: list[float], q: float) -> float | None:
    """numpy's percentile (linear interpolation between closest ranks); None for no values."""
    import numpy

    return float(numpy.percentile(values, q)) if len(values) else None


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def window(records: list[RequestRecord], meta: dict) -> tuple[float, float]:
    """The measured time span: the run's start and end (run.json), else the first request's start
    and the last response's end."""
    t0 = meta.get("started_unix") or min(r.start for r in records)
    t1 = meta.get("ended_unix") or max(r.start + (r.e2e_s or 0) for r in records)
    return t0, max(t1, t0 + 1e-9)


def tenant_order(records: list[RequestRecord], meta: dict) -> list[tuple[str, int, float | None]]:
    """(tenant, rank, Zipf probability), by rank: run.json's tenants (also those never drawn),
    else the tenants seen."""
    if meta.get("tenants"):
        return [(t["name"], t["rank"], t["probability"]) for t in meta["tenants"]]
    ranks = {r.tenant: r.rank for r in records}
    return [(t, rank, None) for t, rank in sorted(ranks.items(), key=lambda kv: kv[1])]


def stats(records: list[RequestRecord], duration_s: float) -> dict:
    ok = [r for r in records if r.status == "ok"]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [x for r in ok for x in r.itls()]
    tpots = [x for r in ok if (x := r.tpot_s()) is not None]
    tokens = sum(n for r in records for _, n in r.events)
    row = {
        "requests": len(records),
        "ok": len(ok),
        "errors": sum(1 for r in records if r.status not in ("ok", "http_429", "cancelled")),
        "cancelled": sum(1 for r in records if r.status == "cancelled"),
        "http_429": sum(1 for r in records if r.status == "http_429"),
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / duration_s, 2),
    }
    for name, values in (("ttft", ttfts), ("itl", itls), ("tpot", tpots)):
        for q in PCTS:
            row[f"{name}_p{q}_ms"] = _ms(percentile(values, q))
    late = [r.late_s for r in records]
    row["late_over_100ms"] = round(sum(x > 0.1 for x in late) / len(late), 4) if late else None
    return row


def summarize(records: list[RequestRecord], meta: dict) -> list[dict]:
    """One row per tenant (by rank, tenants never drawn included) and one `overall`."""
    t0, t1 = window(records, meta)
    by_tenant: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        by_tenant[r.tenant].append(r)
    rows = []
    for tenant, rank, p in tenant_order(records, meta):
        recs = by_tenant.get(tenant, [])
        rows.append(
            {
                "tenant": tenant,
                "rank": rank,
                "zipf_p": p,
                "share": round(len(recs) / len(records), 4) if records else None,
                **stats(recs, t1 - t0),
            }
        )
    rows.append(
        {"tenant": OVERALL, "rank": "", "zipf_p": 1.0, "share": 1.0, **stats(records, t1 - t0)}
    )
    return rows


def timeseries(records: list[RequestRecord], meta: dict, bin_s: float) -> list[dict]:
    """Per bin (seconds since the run's start) and per tenant and overall."""
    t0, t1 = window(records, meta)
    nbins = max(1, math.ceil((t1 - t0) / bin_s))
    tokens: dict[tuple[str, int], int] = defaultdict(int)
    started: dict[tuple[str, int], int] = defaultdict(int)
    ttft: dict[tuple[str, int], list[float]] = defaultdict(list)
    itl: dict[tuple[str, int], list[float]] = defaultdict(list)

    def b(t: float) -> int | None:
        i = math.floor((t - t0) / bin_s)
        return i if 0 <= i < nbins else None

    for r in records:
        for who in (r.tenant, OVERALL):
            if (i := b(r.start)) is not None:
                started[who, i] += 1
                if r.status == "ok" and r.ttft_s is not None:
                    ttft[who, i].append(r.ttft_s)
            prev = None
            for t, n in r.events:
                if (i := b(r.start + t)) is not None:
                    tokens[who, i] += n
                    if prev is not None and r.status == "ok" and n > 0:
                        itl[who, i] += [(t - prev) / n] * n
                prev = t
    rows = []
    names = [t for t, _, _ in tenant_order(records, meta)] + [OVERALL]
    for i in range(nbins):
        width = min(bin_s, t1 - t0 - i * bin_s)
        for who in names:
            rows.append(
                {
                    "t_s": round(i * bin_s, 3),
                    "tenant": who,
                    "tokens_per_s": round(tokens[who, i] / width, 2),
                    "requests_started": started[who, i],
                    "ttft_p50_ms": _ms(percentile(ttft[who, i], 50)),
                    "ttft_p99_ms": _ms(percentile(ttft[who, i], 99)),
                    "itl_p50_ms": _ms(percentile(itl[who, i], 50)),
                    "itl_p99_ms": _ms(percentile(itl[who, i], 99)),
                }
            )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


# ---- plots ---------------------------------------------------------------------------------


def _short(tenant: str) -> str:
    return tenant.rsplit("-", 1)[-1] if tenant.startswith("lt-") else tenant


def plot_percentiles(summary: list[dict], path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["ok"]]
    labels = [_short(r["tenant"]) + (f"\nn={r['ok']}" if len(rows) <= 12 else "") for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.55 * len(rows) + 2), 6.5), sharex=True)
    width = 0.27
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "itl", "ITL")):
        for j, q in enumerate(PCTS):
            ys = [r[f"{metric}_p{q}_ms"] or 0 for r in rows]
            xs = [i + (j - 1) * width for i in range(len(rows))]
            ax.bar(xs, ys, width, label=f"p{q}")
        ax.set_ylabel(f"{title} (ms)")
        _plain_log(ax)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.axvline(len(rows) - 1.5, color="grey", lw=0.8)
    axes[0].legend(ncol=3, fontsize=8)
    axes[0].set_title("Latency percentiles per tenant (by popularity rank) and overall")
    axes[1].set_xticks(range(len(rows)), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _series(ts: list[dict], tenant: str, key: str) -> tuple[list[float], list[float | None]]:
    pts = [(r["t_s"], r[key]) for r in ts if r["tenant"] == tenant]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_tokens(ts: list[dict], summary: list[dict], meta: dict, bin_s: float, path: Path,
                dpi: int) -> None:  # fmt: skip
    import matplotlib.pyplot as plt

    tenants = [r["tenant"] for r in summary if r["tenant"] != OVERALL]
    top, rest = tenants[:TOP_TENANTS], tenants[TOP_TENANTS:]
    xs, _ = _series(ts, OVERALL, "tokens_per_s")
    stacks = [_series(ts, t, "tokens_per_s")[1] for t in top]
    labels = [_short(t) for t in top]
    if rest:
        per = [_series(ts, t, "tokens_per_s")[1] for t in rest]
        stacks.append([sum(v) for v in zip(*per, strict=True)])
        labels.append(f"{len(rest)} others")
    mids = [x + bin_s / 2 for x in xs]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.stackplot(mids, stacks, labels=labels, alpha=0.85, step=None)
    ax.plot(mids, _series(ts, OVERALL, "tokens_per_s")[1], color="black", lw=1.2, label="overall")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(f"output tokens/s ({bin_s:g} s bins)")
    ax.set_title("Output tokens/s over time, per tenant (stacked) and overall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    stages = meta.get("shape_stages") or []
    if stages:
        ax2 = ax.twinx()
        key = "rate" if stages[0].get("rate") else "users"
        end = xs[-1] + bin_s if xs else 0
        sx = [s["t"] for s in stages] + [end]
        sy = [s[key] for s in stages] + [stages[-1][key]]
        ax2.step(sx, sy, where="post", color="grey", ls="--", lw=1)
        ax2.set_ylabel("offered requests/s" if key == "rate" else "users", color="grey")
        ax2.set_ylim(0, max(sy) * 1.3 if max(sy) else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_latency_over_time(ts: list[dict], summary: list[dict], bin_s: float, path: Path,
                           dpi: int) -> None:  # fmt: skip
    import matplotlib.pyplot as plt

    tenants = [r["tenant"] for r in summary if r["tenant"] != OVERALL][:4]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, metric, title in ((axes[0], "ttft", "TTFT"), (axes[1], "itl", "ITL")):
        for q, style in ((50, "-"), (99, "--")):
            xs, ys = _series(ts, OVERALL, f"{metric}_p{q}_ms")
            ax.plot([x + bin_s / 2 for x in xs], ys, style, color="black", lw=1.5,
                    label=f"overall p{q}")  # fmt: skip
        for t in tenants:
            xs, ys = _series(ts, t, f"{metric}_p99_ms")
            ax.plot([x + bin_s / 2 for x in xs], ys, lw=0.8, alpha=0.7, label=f"{_short(t)} p99")
        ax.set_ylabel(f"{title} (ms)")
        _plain_log(ax, zero=metric == "itl")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=3)
    axes[0].set_title(f"Latency over time ({bin_s:g} s bins): overall p50/p99, top tenants' p99")
    axes[1].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_share(summary: list[dict], path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["tenant"] != OVERALL]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(rows) + 2), 3.5))
    xs = list(range(1, len(rows) + 1))
    ax.bar(xs, [r["share"] or 0 for r in rows], label="requests sent (share)")
    if all(r["zipf_p"] is not None for r in rows):
        ax.plot(xs, [r["zipf_p"] for r in rows], "o-", color="C3", label="Zipf probability")
    ax.set_xlabel("tenant rank")
    ax.set_ylabel("share of requests")
    ax.set_xticks(xs)
    ax.set_title("Requests per tenant against the Zipf distribution")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ---- HTML -------------------------------------------------------------------------------------

PLOTS = ("percentiles.png", "tokens_per_s.png", "latency_over_time.png", "tenant_share.png")
COLUMNS = ("tenant", "rank", "zipf_p", "share", "requests", "errors", "http_429", "cancelled",
           "completion_tokens", "tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
           "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "tpot_p50_ms")  # fmt: skip


def write_html(path: Path, summary: list[dict], meta: dict, records: list[RequestRecord]) -> None:
    t0, t1 = window(records, meta)
    e = html.escape

    def cell(v) -> str:
        return "" if v is None else e(str(v))

    params = meta.get("parameters", {})
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in COLUMNS) + "</tr>" for r in summary
    )
    overall = summary[-1]
    html_text = f"""<!doctype html><html><head><meta charset="utf-8">
<title>moelora load test {e(str(meta.get("run_id", "")))}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}img{{max-width:100%}}</style>
</head><body>
<h1>Load test {e(str(meta.get("run_id", "")))}</h1>
<p>Host {e(str(meta.get("host", "")))}; {len(records)} requests in {t1 - t0:.0f} s;
{overall["errors"]} errors, {overall["http_429"]} × 429; {overall["tokens_per_s"]} output
tokens/s; TTFT p50/p99 {overall["ttft_p50_ms"]}/{overall["ttft_p99_ms"]} ms; ITL p50/p99
{overall["itl_p50_ms"]}/{overall["itl_p99_ms"]} ms.</p>
<p>Parameters: {e(json.dumps(params))}</p>
<h2>Per tenant (by popularity rank) and overall</h2>
<table><tr>{head}</tr>{body}</table>
{"".join(f'<h2>{e(p[:-4])}</h2><img src="{p}">' for p in PLOTS)}
<p>Tables: summary.csv, timeseries.csv. Definitions: loadtest/report.py.</p>
</body></html>
"""
    path.write_text(html_text)


def report(run_dir: Path, out: Path | None = None, bin_s: float = 10.0, dpi: int = 80) -> dict:
    out = out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(run_dir / "requests.csv")
    if not records:
        raise SystemExit(f"{run_dir / 'requests.csv'} has no requests")
    meta_path = run_dir / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if "shape_stages" not in meta and meta.get("parameters", {}).get("shape"):
        shape = Shape.parse(meta["parameters"]["shape"])
        meta["shape_stages"] = [
            {"t": t, "users": s.users, "rate": s.rate} for t, s in shape.stages()
        ]
    summary = summarize(records, meta)
    ts = timeseries(records, meta, bin_s)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "timeseries.csv", ts)
    import matplotlib

    matplotlib.use("Agg")
    plot_percentiles(summary, out / "percentiles.png", dpi)
    plot_tokens(ts, summary, meta, bin_s, out / "tokens_per_s.png", dpi)
    plot_latency_over_time(ts, summary, bin_s, out / "latency_over_time.png", dpi)
    plot_share(summary, out / "tenant_share.png", dpi)
    write_html(out / "report.html", summary, meta, records)
    return {"summary": summary, "timeseries": ts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the run directory")
    parser.add_argument("--bin-s", type=float, default=10.0, help="time bin of the over-time data")
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args()
    result = report(args.run_dir, args.out, args.bin_s, args.dpi)
    o = result["summary"][-1]
    print(
        f"{o['requests']} requests, {o['errors']} errors, {o['tokens_per_s']} tokens/s, "
        f"TTFT p50/p99 {o['ttft_p50_ms']}/{o['ttft_p99_ms']} ms, "
        f"ITL p50/p99 {o['itl_p50_ms']}/{o['itl_p99_ms']} ms -> {args.out or args.run_dir}"
    )


if __name__ == "__main__":
    main()
