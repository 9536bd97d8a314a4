"""Weight averaging (Eq. 1): streamed, precise, and strict about what may be averaged.

* Floating-point (and complex) tensors are averaged. The running sum is kept in float32 (or
  float64) whatever the ingredients' dtype, because summing many bf16/fp16 tensors in their own
  precision loses the small increments; the mean is cast back to each tensor's own dtype.
  BatchNorm's running_mean/running_var are float buffers: averaged like weights.
* BatchNorm's step counters (`*.num_batches_tracked`, int64 scalars) count optimizer steps, which
  differ between folds whose training parts differ in size. The soup's counter is the
  (weighted) mean of the ingredients' counters rounded down, computed exactly (rational
  arithmetic): the mean because Eq. 1 takes the mean of everything else (the max would credit
  the averaged statistics with the longest-trained ingredient's steps); a soup of equal counters
  keeps them, and the counter lies between its ingredients'. Torch reads it only in
  `momentum=None` BatchNorm, as the weight of the stored statistics when training continues.
* Every other non-float tensor (bool masks, index buffers) is copied from the first ingredient
  and must be equal in all of them: `int_buffer * (1/N)` is never computed.
* Ingredients are added one at a time (`RunningSum`), so a soup of 90 models needs memory for
  one model plus the running sum, never for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

from foldsoup.errors import SoupError
from foldsoup.storage.weights import state_mismatch

if TYPE_CHECKING:
    from foldsoup.soups.select import Candidate, FoldCount

State = dict[str, torch.Tensor]
AccumDtype = torch.dtype | str

_ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}



def resolve_accum_dtype(accum_dtype: AccumDtype) -> torch.dtype:
    """Accept torch.float32/float64 or their names (config files hold strings)."""
    if isinstance(accum_dtype, str):
        if accum_dtype not in _ACCUM_DTYPES:
            raise ValueError(f"accum_dtype must be one of {sorted(_ACCUM_DTYPES)}, got {accum_dtype!r}")
        return _ACCUM_DTYPES[accum_dtype]
    if accum_dtype not in _ACCUM_DTYPES.values():
        raise ValueError(f"accum_dtype must be torch.float32 or torch.float64, got {accum_dtype!r}")
    return accum_dtype


def is_averaged(t: torch.Tensor) -> bool:
    """Whether a tensor is averaged (floating point or complex) rather than copied."""
    return t.is_floating_point() or t.is_complex()


BN_COUNTER = "num_batches_tracked"


def is_bn_counter(key: str, t: torch.Tensor) -> bool:
    """BatchNorm's step counter: an integer scalar named `num_batches_tracked` (its mean is taken;
    any other integer buffer must be equal in every ingredient)."""
    return key.rsplit(".", 1)[-1] == BN_COUNTER and t.dim() == 0 and not is_averaged(t) and t.dtype != torch.bool


def _counter_mean(weighted_sum: Fraction, total_weight: Fraction, like: torch.Tensor) -> torch.Tensor:
    """floor(weighted sum / total weight) with `like`'s dtype and device. Python fractions: exact
    for any float weights and any int64 counters, where float64 (or an int64 sum) would round or
    overflow."""
    return torch.tensor(weighted_sum // total_weight, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------
# Compatibility checks (RunningSum runs them on every ingredient)
# --------------------------------------------------------------------------------------------


def _check_tensors(state: Mapping[str, object], name: str) -> None:
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SoupError(f"ingredient {name!r}: {key!r} is a {type(value).__name__}, not a tensor")


def _check_fixed_equal(key: str, t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """Non-averaged tensors must be identical: averaging them has no meaning."""
    if not torch.equal(t.to(ref.device), ref):
        raise SoupError(
            f"ingredient {name!r}: non-float tensor {key!r} ({t.dtype}) differs from {ref_name!r}; "
            "integer/bool buffers (other than BatchNorm's num_batches_tracked) are copied, not averaged, "
            "so they must be equal in every ingredient"
        )


# --------------------------------------------------------------------------------------------
# Streaming average
# --------------------------------------------------------------------------------------------


def _check_weight(weight: float, name: str) -> float:
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
        raise SoupError(f"ingredient {name!r}: weight must be finite and > 0, got {weight!r}")
    return w


class RunningSum:
    """Weighted running sum of state dicts; `mean()` is the soup of everything added so far.

    Accumulators live on the device of the first ingredient's tensors (later ingredients are
    moved there) in `promote(tensor dtype, accum_dtype)`, so float64 tensors stay float64.
    """

    def __init__(self, accum_dtype: AccumDtype = "float32") -> None:
        self.accum_dtype = resolve_accum_dtype(accum_dtype)
        self._ref: dict[str, torch.Tensor] = {}  # key -> meta tensor (shape, dtype), key order
        self._sums: dict[str, torch.Tensor] = {}  # averaged keys -> weighted sum
        self._fixed: dict[str, torch.Tensor] = {}  # other keys -> first ingredient's value
        self._counters: dict[str, Fraction] = {}  # BatchNorm step counters -> exact weighted sum
        self._counter_like: dict[str, torch.Tensor] = {}  # counters -> first ingredient's (dtype, device)
        self._exact_weight = Fraction(0)  # total weight of the counters' mean
        self._names: list[str] = []
        self._total_weight = 0.0

    @property
    def count(self) -> int:
        """Number of ingredients added."""
        return len(self._names)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def _label(self, name: str | None) -> str:
        return name if name is not None else f"#{self.count}"

    def _check(self, state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        """Validate everything before any accumulator is touched (no half-added ingredient)."""
        first = self._names[0]
        _check_tensors(state, name)
        problem = state_mismatch(state, self._ref, f"the soup's first ingredient {first!r}", dtypes="exact")
        if problem:
            raise SoupError(f"ingredient {name!r}: {problem}")
        checked = {}
        for key in self._ref:
            t = state[key].detach()
            if key in self._fixed:
                _check_fixed_equal(key, t, self._fixed[key], name, first)
            checked[key] = t
        return checked

    def _start(self, state: Mapping[str, torch.Tensor], name: str, weight: float) -> None:
        _check_tensors(state, name)
        for key, value in state.items():
            t = value.detach()
            self._ref[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")
            if is_averaged(t):
                # copy=True: the accumulator must never alias the caller's tensor (add_ would
                # then modify the ingredient).
                acc = t.to(dtype=torch.promote_types(t.dtype, self.accum_dtype), copy=True)
                if weight != 1.0:
                    acc.mul_(weight)
                self._sums[key] = acc
            elif is_bn_counter(key, t):
                self._counters[key] = Fraction(weight) * int(t)
                self._counter_like[key] = t.clone()
            else:
                self._fixed[key] = t.clone()

    def add(self, state: Mapping[str, torch.Tensor], name: str | None = None, weight: float = 1.0) -> None:
        """Add one ingredient (`name` is used in error messages; default `#<index>`)."""
        label = self._label(name)
        w = _check_weight(weight, label)
        if self.count == 0:
            self._start(state, label, w)
        else:
            checked = self._check(state, label)
            for key, acc in self._sums.items():
                t = checked[key]
                if t.device != acc.device:
                    t = t.to(acc.device)
                if w == 1.0:
                    acc.add_(t)
                else:
                    acc.add_(t, alpha=w)
            for key in self._counters:
                self._counters[key] += Fraction(w) * int(checked[key])
        self._names.append(label)
        self._total_weight += w
        self._exact_weight += Fraction(w)

    def _finish(self, key: str, summed: torch.Tensor, total: float) -> torch.Tensor:
        return summed.div(total).to(self._ref[key].dtype)

    def mean(self) -> State:
        """The (weighted) average of all ingredients, each tensor in its original dtype."""
        if self.count == 0:
            raise SoupError("cannot average zero ingredients")
        out: State = {}
        for key in self._ref:
            if key in self._sums:
                out[key] = self._finish(key, self._sums[key], self._total_weight)
            elif key in self._counters:
                out[key] = _counter_mean(self._counters[key], self._exact_weight, self._counter_like[key])
            else:
                out[key] = self._fixed[key].clone()
        return out

    def mean_with(self, state: Mapping[str, torch.Tensor], name: str | None = None, weight: float = 1.0) -> State:
        """The mean as if `state` had been added, leaving this sum unchanged (greedy soups)."""
        if self.count == 0:
            tmp = RunningSum(self.accum_dtype)
            tmp.add(state, name, weight)
            return tmp.mean()
        label = self._label(name)
        w = _check_weight(weight, label)
        checked = self._check(state, label)
        total = self._total_weight + w
        out: State = {}
        for key in self._ref:
            if key in self._sums:
                acc = self._sums[key]
                summed = torch.add(acc, checked[key].to(acc.device), alpha=w)
                out[key] = summed.div_(total).to(self._ref[key].dtype)
            elif key in self._counters:
                counted = self._counters[key] + Fraction(w) * int(checked[key])
                out[key] = _counter_mean(counted, self._exact_weight + Fraction(w), self._counter_like[key])
            else:
                out[key] = self._fixed[key].clone()
        return out

_END = object()


def average(
    states: Iterable[Mapping[str, torch.Tensor]],
    names: Iterable[str] | None = None,
    accum_dtype: AccumDtype = "float32",
) -> State:
    """Uniform soup of `states`, consumed one at a time (a generator that loads lazily is fine)."""
    running = RunningSum(accum_dtype)
    name_iter = iter(names) if names is not None else None
    # A plain loop plus `del`: zip/enumerate would keep the previous ingredient alive (in their
    # reused result tuple) while the next one is being loaded.
    for state in states:
        name = None if name_iter is None else next(name_iter, _END)
        if name is _END:
            raise SoupError("more states than names")
        running.add(state, name)
        del state
    if name_iter is not None and next(name_iter, _END) is not _END:
        raise SoupError("more names than states")
    return running.mean()


# --------------------------------------------------------------------------------------------
# A SoupScorer over real weights
# --------------------------------------------------------------------------------------------


class RunningSoupScorer:
    """`foldsoup.soups.select.SoupScorer` built on a RunningSum of the accepted ingredients.

    `load(candidate)` returns the candidate's state dict (a model, or a whole soup in the second
    GSGS stage: each candidate weighs the same). `evaluate(state, folds)` returns the val
    accuracy of `state` on each fold in `folds`. Each candidate is loaded once: the state loaded
    for scoring is kept until `accept` (Alg. 1 accepts right after scoring) or the next candidate.

    With `count(state, fold, reaches)`, `fold_size(fold)` and `class_sizes(fold)`
    (evaluation.Evaluator's) it is a
    `select.CountingSoupScorer`: greedy_soup then evaluates fold by fold and stops early. The
    soup with the candidate is averaged once per candidate, whatever the number of folds.
    """

    def __init__(
        self,
        load: Callable[[Candidate], Mapping[str, torch.Tensor]],
        evaluate: Callable[[State, frozenset[int]], Mapping[int, float]],
        accum_dtype: AccumDtype = "float32",
        count: Callable[[State, int, Callable | None], FoldCount] | None = None,
        fold_size: Callable[[int], int] | None = None,
        class_sizes: Callable[[int], tuple[int, ...]] | None = None,
        metric: str = "accuracy",
    ) -> None:
        self._load = load
        self._evaluate = evaluate
        self._count, self._fold_size, self._class_sizes = count, fold_size, class_sizes
        self.counts = count is not None and fold_size is not None and class_sizes is not None
        self.metric = metric
        self.running = RunningSum(accum_dtype)
        self.folds: frozenset[int] = frozenset()
        self._cached: tuple[str, Mapping[str, torch.Tensor]] | None = None
        self._soup: tuple[str, State] | None = None  # average(accepted + [candidate]) of the last candidate

    def _state(self, candidate: Candidate) -> Mapping[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != candidate.name:
            self._cached = None  # free the previous candidate before loading the next
            self._cached = (candidate.name, self._load(candidate))
        return self._cached[1]

    def _soup_with(self, candidate: Candidate) -> State:
        if self._soup is None or self._soup[0] != candidate.name:
            self._soup = None
            self._soup = (candidate.name, self.running.mean_with(self._state(candidate), name=candidate.name))
        return self._soup[1]

    def fold_accs_with(self, candidate: Candidate) -> dict[int, float]:
        soup = self._soup_with(candidate)
        return {int(f): a for f, a in self._evaluate(soup, self.folds | candidate.folds).items()}  # exact fractions

    def fold_size(self, fold: int) -> int:
        return self._fold_size(fold)

    def class_sizes(self, fold: int) -> tuple[int, ...]:
        return self._class_sizes(fold)

    def fold_count_with(self, candidate: Candidate, fold: int, reaches: Callable | None = None) -> FoldCount:
        return self._count(self._soup_with(candidate), fold, reaches)

    def accept(self, candidate: Candidate) -> None:
        self.running.add(self._state(candidate), name=candidate.name)
        self.folds = self.folds | candidate.folds
        self._cached = self._soup = None

    def mean(self) -> State:
        """The accepted soup."""
        return self.running.mean()
