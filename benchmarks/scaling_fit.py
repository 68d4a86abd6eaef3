"""The 2-process check of the communication model on CPU: an alpha-beta fit of gloo's all-reduce sweep, and the
model's predicted step against the measured one (``validate``)."""
from __future__ import annotations


def fit_alpha_beta(sweep: list[dict], world: int) -> dict:
    """Least squares t = alpha + bytes * beta; bus bandwidth = 2 (N-1)/N / beta."""
    xs, ys = [r["bytes"] for r in sweep], [r["t_s"] for r in sweep]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    alpha = max(0.0, my - beta * mx)
    return {"alpha_s": alpha, "busbw_Bps": 2 * (world - 1) / world / beta if beta > 0 else float("inf"),
            "beta_s_per_byte": beta}


def t_allreduce_cpu(nbytes: int, fit: dict) -> float:
    return fit["alpha_s"] + nbytes * fit["beta_s_per_byte"]


def validate(one: dict, two: list[dict], fit: dict, tol: float) -> list[dict]:
    """The model's 2-process step against the measured one. Inputs kept apart from the measured t_sync:
    compute = the 2-process step without gradient sync (what FLOPs / MFU stand for on a GPU), collectives =
    the alpha-beta fit of the sweep applied to the counted messages, hook work = timed alone, overlap = the
    same hook's overlap measured at the *other* stage (leave-one-out; a stage measured alone uses its own,
    and says so). Also reported: t_1proc / t_nosync(2), whether a worker's compute stays the same when a
    second worker runs (the weak-scaling premise; on 2 shared cores it does not)."""
    rows = []
    for m in two:
        other = [x for x in two if x["hook"] == m["hook"] and x["stage"] != m["stage"]]
        f, f_src = (other[0]["overlap"], f"stage {other[0]['stage']}") if other else (m["overlap"], "own (circular)")
        t_ar_model = sum(t_allreduce_cpu(b, fit) for b in m["collective_bytes"])
        pred = m["t_nosync_s"] + (1 - f) * (t_ar_model + m["t_hook_s"])
        err = pred / m["t_sync_s"] - 1
        t1 = one[m["stage"]]["step_s"]
        rows.append({"stage": m["stage"], "hook": m["hook"], "t_1proc_s": t1, "t_nosync_2proc_s": m["t_nosync_s"],
                     "compute_ratio_2proc_over_1proc": m["t_nosync_s"] / t1, "overlap_used": f,
                     "overlap_from": f_src, "t_ar_model_s": t_ar_model, "t_ar_measured_s": m["t_ar_s"],
                     "t_hook_s": m["t_hook_s"], "predicted_step_s": pred, "measured_step_s": m["t_sync_s"],
                     "rel_error": err, "within_tolerance": abs(err) <= tol,
                     "efficiency_measured": t1 / m["t_sync_s"], "efficiency_predicted": t1 / pred})
    return rows
