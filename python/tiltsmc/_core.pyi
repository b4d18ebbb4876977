# Stubs of the compiled module; tiltsmc.core wraps it with argument checks.
import numpy as np
import numpy.typing as npt

def log_normalize(
    logw: npt.NDArray[np.floating], allow_zero_rows: bool
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def row_statistics(
    logw: npt.NDArray[np.floating],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def smc_step(
    log_w: npt.NDArray[np.floating], threshold: float, scheme: int, key: int
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.bool_],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]: ...
def resample(logw: npt.NDArray[np.floating], scheme: int, num: int, key: int) -> npt.NDArray[np.int64]: ...
def pool_select(
    logw: npt.NDArray[np.floating], key: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
def sample_logits(
    logits: npt.NDArray[np.floating], temperature: float, key: int, log_n: float
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
def reorder_in_place(arrays: list[np.ndarray], ancestors: npt.NDArray[np.int64]) -> None: ...
def keep_survivors(ancestors: npt.NDArray[np.int64]) -> None: ...
def set_num_threads(num_threads: int) -> None: ...
def get_num_threads() -> int: ...
