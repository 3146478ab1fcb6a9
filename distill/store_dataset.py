"""Stage-2 data: the feature store read as shuffled training batches, split over processes and workers.

zarr-python 3.1 reads single samples slowly (an index fetch and a chunk decode each), so every read
here is one whole chunk: a *block* of `chunk_samples` consecutive samples of one unit at one view.
Shuffling happens at two levels: the block order (per epoch) and the samples of a window of
`train.shuffle_window` consecutive samples of that order (in memory).

Epoch e, the same on every process and worker:
  - block order  = permutation seeded by (seed, e); each block gets one view drawn from (seed, e, block);
  - sample order = the blocks' usable rows concatenated in that order: S samples;
  - T = floor(S / (world_size * B)) rounded down to a multiple of W = max(1, train.num_workers) batches
    per process; every process gets the same T, so uneven units can never leave one rank waiting in
    a DDP collective. The dropped tail (< world_size*B*W samples) differs from epoch to epoch;
  - rank r owns samples [r*T*B, (r+1)*T*B); its *logical* worker j owns the j-th contiguous T/W batches.

A DataLoader (batch_size=None) takes batches round-robin from its workers, so rank batch i comes from
logical worker i % W. Resuming at global step s (epoch s // T, batch b = s % T), physical worker w
plays logical worker (w + b) % W and skips the batches that worker had produced before b: the first
batch after the resume is exactly batch b, and every later one equals an uninterrupted run's.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch

from distill.batch import StudentBatch
from distill.batch_pool import TORCH_DTYPES, BatchPool
from store_schema.config import PipelineConfig
from store_schema.fingerprint import TRAINING_FIELDS, StoreMismatchError, fingerprint_from_config
from store_schema.store import FeatureStore, StoreError, UnitInfo

# Independent random streams under one seed: the tag keeps (seed, e) of one from meeting another's.
_ORDER, _VIEW, _WINDOW = 0, 1, 2
# Blocks of a window read concurrently: one zarr read is a chain of small requests (shard index, then
# chunk, per array), latency-bound on object stores and ~6x faster threaded even on a local disk.
_READ_THREADS = 16
# How blocks are read (FeatureStore.read_block's engine): "zarr" through zarr-python's pipeline (the
# reference, and the baseline of benchmarks/bench_reader.py), "direct" with store_schema.chunkread
# (the same chunks, checksums and refusals, several times less CPU per block; the default).
ENGINES = ("zarr", "direct")


def check_store_matches(cfg: PipelineConfig, storage_options: dict | None = None) -> FeatureStore:
    """Open cfg.store.root for training; refuse a store written for another configuration or with no data.

    Only the fields training depends on are compared (TRAINING_FIELDS: sizes, mask fractions,
    views, teachers, schema version); every differing field is named.
    """
    try:
        store = FeatureStore.open(cfg.store.root, expect=fingerprint_from_config(cfg), fields=TRAINING_FIELDS,
                                  storage_options=storage_options)
    except StoreMismatchError as e:
        raise StoreMismatchError(
            f"{e}\nTrain with the configuration the store was written with (saved in the store's root "
            "attributes as comad.config_toml), or extract a new store with this one.") from e
    if not store.units():
        started = len(store.units(complete_only=False))
        raise StoreError(f"{cfg.store.root} holds no complete unit ({started} started, none finished): run "
                         "comad-extract to completion first (it resumes where it stopped)")
    return store


class StoreBatches(torch.utils.data.IterableDataset):
    """Endless training batches of one process (rank): epoch after epoch, from `start_step` on.

    Each item is a StudentBatch (distill/batch.py) of CPU tensors, with "teacher_patch" {t: float16 or float32
    (B,Kt,D)} for the teachers being distilled (train.teachers) in store order, plus "teacher_cls" {t: (B,D)}
    when loss.cls_weight > 0. A float16 store's targets stay float16 (the model converts them on its device:
    half the bytes through the loader and worker queue). With `int8_targets=True` an int8 store's
    targets stay int8 too, with "teacher_patch_scale" {t: float32 (B,Kt)} (and "teacher_cls_scale"
    {t: (B,)}) beside them, decoded on the device by dequantize_targets (the trainer does this); by
    default they arrive decoded, float32. View boxes and labels are not read, nor CLS features without
    a CLS term: the trainer uses none of them. `engine` chooses how blocks are read (ENGINES).
    Global step s of this rank is the s-th item of a run started at 0; the trainer stops the loop.
    `store` / `units`: an already checked store and the complete units to train on (the trainer's, listed
    once at set-up); by default the store is checked here and its complete units listed now.
    """

    def __init__(self, cfg: PipelineConfig, rank: int, world_size: int, start_step: int = 0,
                 storage_options: dict | None = None, engine: str = ENGINES[-1], int8_targets: bool = False,
                 store: FeatureStore | None = None, units: list[UnitInfo] | None = None):
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine = {engine!r}: choose one of {', '.join(ENGINES)}")
        self.engine, self.int8_targets = engine, int8_targets
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size = {world_size})")
        if start_step < 0:
            raise ValueError(f"start_step = {start_step} must be >= 0")
        if cfg.seed < 0:
            raise ValueError(f"seed = {cfg.seed}: the data order needs a seed >= 0")
        if store is None:  # the trainer passes the store it checked (and the units all ranks agreed on)
            store = check_store_matches(cfg, storage_options)  # the main process only; workers reopen
        self.root, self.storage_options = cfg.store.root, storage_options
        self.seed, self.rank, self.world_size, self.start_step = cfg.seed, rank, world_size, start_step
        self.batch_size, self.window = cfg.train.batch_size, cfg.train.shuffle_window
        self.num_workers = max(1, cfg.train.num_workers)  # W logical workers
        self.num_views = store.num_views
        self.teachers = cfg.distill_teachers  # only these teachers' bytes are read
        self.read_cls = cfg.loss.cls_weight > 0
        self.batch_bytes = _batch_bytes_bound(store.meta, self.teachers, self.batch_size)
        self.pool: BatchPool | None = None  # set by StoreLoader before it starts workers (distill/batch_pool.py)

        # Blocks are fixed here, from the units complete now (or those given): workers must not list units
        # again, or a store still being extended would give them different epochs.
        units = store.units() if units is None else units
        self.blocks, self.block_sizes, self.kept_rows = _plan_blocks(units, int(store.meta["chunk_samples"]))
        self.num_samples = int(self.block_sizes.sum())

        per_step = world_size * self.batch_size
        per_rank = self.num_samples // per_step
        if per_rank == 0:
            raise StoreError(
                f"{self.root} holds {self.num_samples} usable samples in {len(units)} complete units, fewer "
                f"than one step needs (world_size {world_size} x train.batch_size {self.batch_size} = {per_step}): "
                "extract more data, or lower train.batch_size or the number of processes")
        if per_rank < self.num_workers:
            raise StoreError(
                f"{self.root} holds {self.num_samples} usable samples: {per_rank} batches per process per epoch, "
                f"fewer than train.num_workers = {self.num_workers} (each worker needs a whole share): "
                f"set train.num_workers <= {per_rank}")
        self.steps_per_epoch = per_rank // self.num_workers * self.num_workers  # T
        self.worker_batches = self.steps_per_epoch // self.num_workers  # T / W

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, running = (0, 0) if info is None else (info.id, info.num_workers)
        W = self.num_workers
        if max(1, running) != W:
            raise RuntimeError(f"StoreBatches was built for train.num_workers = {W} (it decides the data split) "
                               f"but runs with {running} DataLoader workers; use make_loader(dataset, {W})")
        epoch, b = divmod(self.start_step, self.steps_per_epoch)
        logical = (physical + b) % W
        self._physical = physical
        skip = (b - logical + W - 1) // W  # batches i < b with i % W == logical: already trained on
        store = FeatureStore.open(self.root, storage_options=self.storage_options)  # in this process
        with ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="store-read") as pool:
            while True:
                yield from self._worker_epoch(store, pool, epoch, logical, skip)
                epoch, skip = epoch + 1, 0

    def _worker_epoch(self, store: FeatureStore, pool: ThreadPoolExecutor, epoch: int, logical: int,
                      skip: int) -> Iterator[dict[str, Any]]:
        """Logical worker `logical`'s batches of one epoch, after its first `skip`."""
        if skip >= self.worker_batches:
            return
        n_blocks, B = len(self.blocks), self.batch_size
        order = np.random.default_rng([self.seed, _ORDER, epoch]).permutation(n_blocks)
        # Views of an image are i.i.d. draws, so one view per block is distributed like one view per
        # image, while each read touches 1/V of the bytes (a chunk holds one view of its samples).
        views = np.random.default_rng([self.seed, _VIEW, epoch]).integers(0, self.num_views, size=n_blocks)
        starts = np.concatenate([[0], np.cumsum(self.block_sizes[order])])  # epoch position of order[k]
        lo = (self.rank * self.steps_per_epoch + logical * self.worker_batches) * B
        hi = lo + self.worker_batches * B
        per_window = self.window // B  # shuffle_window is a multiple of B (config validation)
        drop = skip % per_window
        carry: dict[int, dict[str, Any]] = {}  # the block a window boundary cut: the next window starts in it
        for a in range(lo + skip // per_window * self.window, hi, self.window):
            c = min(a + self.window, hi)
            parts, part_of, row_of = self._read_window(store, pool, order, views, starts, a, c, carry)
            perm = np.random.default_rng([self.seed, _WINDOW, epoch, self.rank, a]).permutation(c - a)
            for s in range(drop * B, c - a, B):
                take = perm[s:s + B]
                yield _gather(parts, part_of[take], row_of[take], self.pool, self._physical)
            drop = 0

    def _read_window(self, store: FeatureStore, pool: ThreadPoolExecutor, order: np.ndarray, views: np.ndarray,
                     starts: np.ndarray, a: int, c: int, carry: dict[int, dict[str, Any]]
                     ) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
        """Epoch positions [a, c): (blocks as read, and for each position its block in that list and row in it).

        Nothing is copied here: a batch is gathered from the blocks once (_gather), straight into its
        own tensors. `carry` holds at most the block at position k that the previous window ended
        inside; it is replaced by this window's last block when that one goes on past c (a window
        smaller than a chunk would otherwise read each chunk several times).
        """
        first = int(np.searchsorted(starts, a, side="right")) - 1
        last = int(np.searchsorted(starts, c - 1, side="right")) - 1

        def read(k: int) -> dict[str, Any]:
            if k in carry:
                return carry[k]
            block = int(order[k])
            unit, start, stop = self.blocks[block]
            # The whole block even when the window needs part of it: one chunk is the cheapest read.
            data = store.read_block(unit, start, stop, int(views[block]), teachers=self.teachers, meta=False,
                                    cls=self.read_cls, keep_float16=True, keep_int8=self.int8_targets,
                                    engine=self.engine)
            teachers = data["teachers"]
            out: StudentBatch = {"pixels": data["pixels"], "student_idx": data["student_idx"],
                   "teacher_idx": {t: v["idx"] for t, v in teachers.items()},
                   "teacher_patch": {t: v["patch"] for t, v in teachers.items()}}
            if self.read_cls:
                out["teacher_cls"] = {t: v["cls"] for t, v in teachers.items()}
            if self.int8_targets and store.meta["dtype"] == "int8":
                out["teacher_patch_scale"] = {t: v["patch_scale"] for t, v in teachers.items()}
                if self.read_cls:
                    out["teacher_cls_scale"] = {t: v["cls_scale"] for t, v in teachers.items()}
            return out

        ks = range(first, last + 1)
        blocks = list(pool.map(read, ks))
        carry.clear()
        if starts[last + 1] > c:
            carry[last] = blocks[-1]
        part_of, row_of = [], []
        for j, k in enumerate(ks):
            block = int(order[k])
            take = np.arange(max(a - starts[k], 0), min(c - starts[k], self.block_sizes[block]))
            rows = self.kept_rows[block][take] if block in self.kept_rows else take
            part_of.append(np.full(rows.size, j))
            row_of.append(rows)
        return blocks, np.concatenate(part_of), np.concatenate(row_of)


def _plan_blocks(units: list[UnitInfo], chunk: int) -> tuple[list[tuple[str, int, int]], np.ndarray,
                                                               dict[int, np.ndarray]]:
    """The read blocks of `units`, one per chunk of the store's own chunking (`chunk`, not this config's):
    ([(unit, start, stop)], usable rows per block, {block: usable row offsets} only where rows are excluded)."""
    blocks: list[tuple[str, int, int]] = []
    sizes: list[int] = []
    kept_rows: dict[int, np.ndarray] = {}
    for u in units:
        excluded = np.asarray(u.excluded_rows, dtype=np.int64)
        for start in range(0, u.n_samples, chunk):
            stop = min(start + chunk, u.n_samples)
            rows = np.arange(stop - start)
            if excluded.size:
                rows = rows[~np.isin(rows + start, excluded)]
                if rows.size == 0:
                    continue
                if rows.size < stop - start:
                    kept_rows[len(blocks)] = rows
            blocks.append((u.name, start, stop))
            sizes.append(int(rows.size))
    return blocks, np.asarray(sizes, dtype=np.int64), kept_rows


def _batch_bytes_bound(meta: dict[str, Any], teachers: list[str], batch: int) -> int:
    """An upper bound of one batch's bytes (float32 targets, int8 scales, int64 indices, CLS, alignment):
    the size of a BatchPool buffer. Pages of it a smaller batch never touches are never allocated."""
    p, ks = int(meta["patch_size"]), int(meta["student_tokens"])
    per = ks * 3 * p * p + ks * 8
    for t in teachers:
        kt, d = int(meta["teachers"][t]["tokens"]), int(meta["teachers"][t]["dim"])
        per += kt * 8 + kt * d * 4 + d * 4 + kt * 4 + 4
    return batch * per + 64 * (2 + 6 * len(teachers))


def _gather(parts: list[dict[str, Any]], part_of: np.ndarray, row_of: np.ndarray, pool: BatchPool | None = None,
            worker: int = 0) -> dict[str, Any]:
    """One batch: sample j = row row_of[j] of block part_of[j], leaf by leaf, copied once into a tensor.

    In a loader worker with a pool the batch is gathered into one of the worker's reused shared buffers
    and only its layout is returned (distill/batch_pool.py: StoreLoader turns it back into tensors).
    Otherwise, in a worker, the tensors are allocated in new shared memory (as torch's own collate
    does), so handing the batch to the trainer copies nothing more.
    """
    shared = torch.utils.data.get_worker_info() is not None
    pairs = list(zip(part_of.tolist(), row_of.tolist()))

    def fill(o: np.ndarray, *xs: np.ndarray) -> None:
        for j, (k, r) in enumerate(pairs):
            o[j] = xs[k][r]

    if shared and pool is not None:
        packed = pool.pack(worker, parts, len(pairs), fill)
        if packed is not None:
            return packed

    def leaf(*xs: np.ndarray) -> torch.Tensor:
        x0 = xs[0]
        shape = (len(pairs), *x0.shape[1:])
        dtype = TORCH_DTYPES[x0.dtype.str.lstrip('<|=')]
        if shared:
            t = torch.empty(0, dtype=dtype)
            storage = t._typed_storage()._new_shared(int(np.prod(shape)), device=t.device)
            out = t.new(storage).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype)
        fill(out.numpy(), *xs)
        return out

    return _tree(leaf, *parts)


def _tree(fn: Callable[..., Any], *trees: Any) -> Any:
    """fn applied leaf-wise over nested dicts of the same keys."""
    if isinstance(trees[0], dict):
        return {k: _tree(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def dequantize_targets(batch: StudentBatch) -> StudentBatch:
    """Decode an int8 store's targets where the batch is (the trainer calls it after moving it to the device).

    StoreBatches(int8_targets=True) delivers an int8 store's features as stored — int8 values plus
    "teacher_patch_scale" {t: (B, Kt)} and "teacher_cls_scale" {t: (B,)} float32 — a quarter of the
    float32 bytes through the loader, workers and host-to-device copy. This applies the contract's
    decoding (store_schema/README.md, "int8 decoding": x = sign(q) · (q/127)² · scale) in float32, op
    for op as store_schema.codec.decode_features does in numpy, so the values are the same bits.
    A batch without scales (float16/float32 stores, online targets) is returned as it is.
    """
    if "teacher_patch_scale" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if not k.endswith("_scale")}
    for key in ("teacher_patch", "teacher_cls"):
        scales = batch.get(f"{key}_scale")
        if scales is not None:
            out[key] = {t: _dequantize(q, scales[t]) for t, q in batch[key].items()}
    return out


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = q.to(torch.float32) / 127.0
    return torch.sign(x) * x * x * scale.to(torch.float32).unsqueeze(-1)


class StoreLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers hand batches over in reused shared buffers (distill/batch_pool.py).

    Each iteration (which starts the workers) maps a new BatchPool first, so forked workers share it;
    `last_pool` is that pool (its `pooled` / `fresh` counts say how batches arrived).
    """

    last_pool: BatchPool | None = None
    use_pool = True  # False: torch's own transport (a new shared buffer per batch; the benchmark's baseline)

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        pool = None
        if self.use_pool and self.num_workers > 0 and torch.multiprocessing.get_start_method() == "fork":
            pool = BatchPool(self.num_workers, ds.batch_bytes, slots=self.prefetch_factor + 2)
        ds.pool = self.last_pool = pool  # read by the workers forked below, never by this process
        it = super().__iter__()
        if pool is None:
            return it
        return self._unpacked(it, pool, self.pin_memory)

    @staticmethod
    def _unpacked(it: Iterator[Any], pool: BatchPool, pin: bool) -> Iterator[Any]:
        from torch.utils.data._utils.pin_memory import pin_memory
        for item in it:
            batch = pool.unpack(item)
            # A pooled batch reaches here unpinned (the loader's pin thread saw only its layout): pin it
            # now, a copy, after which its buffer goes straight back to the worker.
            yield pin_memory(batch) if pin and batch is not item else batch


def make_loader(dataset: StoreBatches, num_workers: int, pool: bool = True) -> StoreLoader:
    """The loader for `dataset`: whole batches from the dataset, workers taken round-robin.

    num_workers must be the train.num_workers the dataset was built with (0 and 1 both mean one
    logical worker): the split of an epoch over workers, and so resuming, depends on it. With `pool`
    (the default) workers hand batches over in reused shared buffers (StoreLoader), else through
    torch's transport; the batches are the same either way.
    """
    if max(1, num_workers) != dataset.num_workers:
        raise ValueError(f"num_workers = {num_workers}, but the dataset was built for train.num_workers = "
                         f"{dataset.num_workers}; pass that, or rebuild the dataset")
    loader = StoreLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         pin_memory=torch.cuda.is_available(),
                         worker_init_fn=_lower_priority if num_workers else None)
    loader.use_pool = pool
    return loader


_LOADER_NICE = 10


def _lower_priority(worker_id: int) -> None:
    """Run a loader worker at a lower CPU priority (nice +_LOADER_NICE).

    Training keeps all cores busy with intra-op threads that meet at barriers, so a worker that
    preempts one of them stalls them all: on a CPU-bound trainer a higher nice level lets the
    worker run in the step's idle moments instead. It changes nothing where cores are spare.
    """
    try:
        os.nice(_LOADER_NICE)
    except (AttributeError, OSError):  # no nice() on this platform, or not permitted: keep the default
        pass
