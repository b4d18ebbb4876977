# Stubs of the optional compiled CUDA module; tiltsmc.core validates arguments and passes raw pointers
# (device addresses and stream handles as ints). Built only where a CUDA compiler was found.

class CudaError(RuntimeError): ...

class DeviceBuffer:
    def __init__(self, nbytes: int, device: int, stream: int) -> None: ...
    @property
    def ptr(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def stream(self) -> int: ...

def probe() -> tuple[bool, str, int]: ...
def pointer_device(pointer: int) -> int: ...
def stream_device(stream: int) -> int: ...
def log_normalize(
    logw: int,
    rows: int,
    n: int,
    is_double: bool,
    allow_zero_rows: bool,
    normalised: int,
    log_mean_w: int,
    ess: int,
    device: int,
    stream: int,
) -> None: ...
def resample(
    logw: int,
    rows: int,
    n: int,
    is_double: bool,
    scheme: int,
    num: int,
    key: int,
    ancestors: int,
    device: int,
    stream: int,
) -> None: ...
def smc_step(
    log_w: int,
    rows: int,
    n: int,
    is_double: bool,
    threshold: float,
    scheme: int,
    key: int,
    ancestors: int,
    resampled: int,
    log_mean_w: int,
    ess: int,
    unique: int,
    device: int,
    stream: int,
    check: bool,
) -> None: ...
def pool_select(
    logw: int,
    rows: int,
    n: int,
    is_double: bool,
    key: int,
    index: int,
    log_mean_w: int,
    device: int,
    stream: int,
) -> None: ...
def mh_accept(
    log_z_current: int, log_z_proposed: int, rows: int, key: int, accept: int, device: int, stream: int
) -> None: ...
def gather(
    x: int,
    rows: int,
    n: int,
    item_bytes: int,
    ancestors: int,
    m: int,
    out: int,
    in_place: bool,
    device: int,
    stream: int,
) -> None: ...
def copy_bytes(target: int, source: int, nbytes: int, to_host: bool, device: int, stream: int) -> None: ...
def copy_device(target: int, source: int, nbytes: int, device: int, stream: int) -> None: ...
def synchronize(device: int, stream: int) -> None: ...
