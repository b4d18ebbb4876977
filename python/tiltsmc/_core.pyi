# Stubs of the compiled module; tiltsmc.core wraps it with argument checks.
from typing import Optional

import numpy as np
import numpy.typing as npt

def log_normalize(
    logw: npt.NDArray[np.floating], allow_zero_rows: bool
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def row_statistics(
    logw: npt.NDArray[np.floating],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def smc_step(
    log_w: npt.NDArray[np.floating], threshold: float, scheme: int, key: int, survivors_stay: bool
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.bool_],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]: ...
def smc_reweight(
    log_w: npt.NDArray[np.float64],
    log_v: npt.NDArray[np.float64],
    log_v_prev: npt.NDArray[np.float64],
    live: npt.NDArray[np.bool_],
    log_total: npt.NDArray[np.float64],
    log_z: npt.NDArray[np.float64],
    collapsed: npt.NDArray[np.bool_],
    log_n: float,
    threshold: float,
    scheme: int,
    key: int,
    increment_se: Optional[npt.NDArray[np.float64]] = None,
    keys: Optional[npt.NDArray[np.uint64]] = None,
    counters: Optional[npt.NDArray[np.uint64]] = None,
    thresholds: Optional[npt.NDArray[np.float64]] = None,
    schemes: Optional[npt.NDArray[np.uint8]] = None,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.bool_],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
]: ...
def resample(logw: npt.NDArray[np.floating], scheme: int, num: int, key: int) -> npt.NDArray[np.int64]: ...
def pool_select(
    logw: npt.NDArray[np.floating],
    key: int,
    keys: npt.NDArray[np.uint64] | None = None,
    counters: npt.NDArray[np.uint64] | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
def sample_logits(
    logits: npt.NDArray[np.floating],
    temperature: float,
    key: int,
    active: npt.NDArray[np.bool_] | None,
    keys: npt.NDArray[np.uint64] | None = None,
    counters: npt.NDArray[np.uint64] | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
def mh_accept(
    log_z_current: npt.NDArray[np.float64], log_z_proposed: npt.NDArray[np.float64], key: int
) -> npt.NDArray[np.bool_]: ...
def gather(
    x: np.ndarray,
    ancestors: npt.NDArray[np.int64],
    out: np.ndarray,
    rows: int,
    num_particles: int,
    item_bytes: int,
) -> None: ...
def reorder_in_place(
    arrays: list[np.ndarray],
    ancestors: npt.NDArray[np.int64],
    skip_unwritable: bool,
    used: Optional[npt.NDArray[np.int64]] = None,
    axes: Optional[list[Optional[int]]] = None,
) -> list[int]: ...
def keep_survivors(ancestors: npt.NDArray[np.int64]) -> None: ...
def concatenate_padded(
    parts: list[np.ndarray],
    lengths: list[int],
    skips: list[int],
    out: np.ndarray,
    blocks: int,
    item_bytes: int,
    pad_end: bool,
    used: Optional[npt.NDArray[np.int64]] = None,
) -> None: ...
def append_tokens(
    tokens: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    finished: npt.NDArray[np.bool_],
    new_tokens: npt.NDArray[np.int64],
    active: npt.NDArray[np.bool_],
    stop_ids: npt.NDArray[np.int64],
    max_length: int,
) -> tuple[npt.NDArray[np.bool_], int]: ...
def decode_inputs(
    mask: npt.NDArray[np.int64], still: npt.NDArray[np.bool_], new_tokens: npt.NDArray[np.int64], pad: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def decode_inputs_right_padded(
    mask: npt.NDArray[np.int64], still: npt.NDArray[np.bool_], new_tokens: npt.NDArray[np.int64], pad: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def right_padded_prefixes(
    prompt_ids: npt.NDArray[np.int64],
    prompt_offsets: npt.NDArray[np.int64],
    tokens: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    selected: npt.NDArray[np.int64] | None,
    pad: int,
    with_positions: bool,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64] | None
]: ...
def read_log_values(
    scores: np.ndarray, rows: int, columns: npt.NDArray[np.int64] | None, kind: int
) -> npt.NDArray[np.float64]: ...
def set_num_threads(num_threads: int) -> None: ...
def get_num_threads() -> int: ...
