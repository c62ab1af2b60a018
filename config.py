"""Settings and per-linear results shared by the driver, the CLI, the checkpoints and the reports."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


TRIAL_ROWS = 512  # rows per linear that a trial solve of --auto_select solve works on


class UsageError(Exception):
    """Bad input the user can fix; reported as one line with exit code 2."""


@dataclass(frozen=True)
class CompressConfig:
    """Everything the per-layer compression needs; built once from the CLI."""
    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0
    wbits: int = 16
    groupsize: int = -1
    sym: bool = False
    target_avg_bits: float = 4.0
    use_mi_grouping: bool = True
    n_groups: int = 10
    min_bits: int = 2
    max_bits: int = 8
    percdamp: float = 0.01
    blocksize: int = 128
    rtn: bool = False
    act_order: bool = False
    mi_method: str = "gaussian"
    grouping: str = "mi_hessian"
    mi_tokens: int = 8192
    mask_scope: str = "row"
    no_kernel: bool = False
    seed: int = 0
    bits_budget: str = "weight"   # what --target_avg_bits bounds: "weight" bits, or everything "stored"
    n_groups_max: int = 32        # the most clusters --n_groups auto (n_groups 0) considers
    clip: str = "mse"             # grid range: "mse" (clipping search), or "minmax"
    true_sequential: bool = True  # each linear set's Hessian after the earlier sets are compressed
    auto_groupsize: int = 128     # --n_groups auto with a stored budget also tries clusters cut into runs of this (0: not)
    auto_select: str = "solve"    # --n_groups auto picks by the solver's loss on trial solves ("solve") or the proxy

    @property
    def mixed(self) -> bool:
        """MI mode: per-cluster widths around the target (quantization on, MI grouping on)."""
        return self.use_mi_grouping and self.wbits < 16 and not self.rtn

    @property
    def auto_groups(self) -> bool:
        """--n_groups auto: the number of clusters is chosen per linear set (n_groups 0)."""
        return self.n_groups <= 0

    @property
    def prunes(self) -> bool:
        return self.sparsity > 0 or self.prunen > 0

    @property
    def compresses(self) -> bool:
        """Whether any weight changes (without pruning or quantization the run only evaluates)."""
        return self.prunes or self.wbits < 16

    @property
    def calibrates(self) -> bool:
        """Whether calibration activations are needed (round-to-nearest needs none)."""
        return self.compresses and not self.rtn

    @property
    def target_sparsity(self) -> float:
        """The fraction of weights pruned: --sparsity, or N/M."""
        return self.sparsity or (self.prunen / self.prunem if self.prunem else 0.0)

    @property
    def solver_groupsize(self) -> int:
        """Columns per scale/zero inside a group: MI mode has one grid per (row, cluster)."""
        return -1 if self.mixed else self.groupsize

    def solver_options(self) -> dict:
        """Keyword arguments of LinearSolver.solve_steps."""
        return dict(sparsity=self.sparsity, prunen=self.prunen, prunem=self.prunem, groupsize=self.solver_groupsize,
                    sym=self.sym, percdamp=self.percdamp, blocksize=self.blocksize,
                    act_order=self.mixed or self.act_order, mask_scope=self.mask_scope, use_kernel=not self.no_kernel,
                    mse=self.clip == "mse")


@dataclass
class LinearReport:
    """What compressing one linear gave: its figures, its channel groups and (for packed saves)
    the quantization grid."""
    shape: list[int]
    sparsity: float
    avg_bits: float
    effective_bits: float
    loss: float
    seconds: float
    groups: list[dict] = field(default_factory=list)
    # bits per weight of everything the packed file holds for this linear (codes, scales, zeros,
    # permutation, sparsity encoding; 16 where it is stored dense)
    stored_bits: float = 16.0
    # grid of the quantized weights, for packed saves: perm (in,), runs [(start, end, bits)]
    # over permuted columns, scale/zero (out, n_runs); None where nothing was quantized
    qparams: dict | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "qparams"}

    def without_grid(self) -> "LinearReport":
        """The same report without qparams (its scales and zeros: megabytes at 7B), for a run
        that has written them and keeps only the figures."""
        return replace(self, qparams=None)
