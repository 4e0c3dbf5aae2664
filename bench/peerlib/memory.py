"""Where a process's memory is: its resident set now and at its peak, and the MB its
tensors hold (policy, pi_ref, optimizer state, gradients)."""

from __future__ import annotations

from pathlib import Path


def rss_mb(field: str = "VmHWM") -> float:
    """Peak resident set of this process so far (VmHWM), or the current one (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tensor_mb(tensors) -> float:
    """MB held by the distinct storages of `tensors` (tied or shared tensors counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total / 2**20


def memory_phase(name: str, policy, reference=None, optimizer=None) -> dict:
    """One row of the memory mode's profile: the process's resident set now and at its peak, and
    what its tensors hold: the policy's weights, pi_ref's stored weights, AdamW's moments and the
    gradients alive at that moment."""
    row = {"phase": name, "rss_mb": round(rss_mb("VmRSS"), 1), "peak_rss_mb": round(rss_mb(), 1),
           "policy_mb": round(_tensor_mb(policy.parameters()), 1),
           "gradients_mb": round(_tensor_mb(p.grad for p in policy.parameters()), 1)}
    if reference is not None:
        row["reference_mb"] = round(_tensor_mb([*reference.parameters(), *reference.buffers()]), 1)
    if optimizer is not None:
        row["optimizer_state_mb"] = round(_tensor_mb(t for st in optimizer.state.values() for t in st.values()
                                                     if hasattr(t, "untyped_storage")), 1)
    return row

