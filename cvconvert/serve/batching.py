"""Dynamic batching (opt-in, `--max-batch`): concurrent requests with the same per-row shapes are stacked
along the batch axis, run once, and split back."""

from __future__ import annotations

import asyncio

import numpy as np

from .protocol import V2_TO_NP


class Batcher:
    """Stacks concurrent requests for one model. Only for graphs whose rows are independent (checked at
    start-up by `rows_independent`), so a client's answer never depends on who else was in the batch."""

    def __init__(self, model, executor, max_batch: int, delay_s: float, concurrency: int):
        self.model, self.executor, self.max_batch, self.delay_s = model, executor, max_batch, delay_s
        self.queue: asyncio.Queue | None = None
        self.slots: asyncio.Semaphore | None = None
        self.concurrency = concurrency
        self.task = None
        self.running: set = set()

    def _start(self):
        self.queue = asyncio.Queue()
        self.slots = asyncio.Semaphore(self.concurrency)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        if self.task is None:
            self._start()
        fut = asyncio.get_running_loop().create_future()
        key = (tuple(names), tuple((k, v.shape[1:]) for k, v in sorted(feeds.items())))
        await self.queue.put((key, feeds, names, fut))
        return await fut

    async def _collect(self, first) -> tuple[list, object]:
        """(the batch that starts with `first`, the queued item that starts the next one or None)."""
        batch = [first]
        rows = len(next(iter(first[1].values())))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.delay_s
        while rows < self.max_batch:
            timeout = deadline - loop.time()
            try:
                item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            n = len(next(iter(item[1].values())))
            if item[0] != first[0] or rows + n > self.max_batch:
                return batch, item  # starts the next batch
            batch.append(item)
            rows += n
        return batch, None

    async def _loop(self):
        pending = None
        while True:
            batch, pending = await self._collect(pending or await self.queue.get())
            await self.slots.acquire()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.running.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self.running.discard)

    async def _run(self, batch):
        try:
            names = batch[0][2]
            counts = [len(next(iter(b[1].values()))) for b in batch]
            feeds = {k: np.concatenate([b[1][k] for b in batch]) if len(batch) > 1 else batch[0][1][k]
                     for k in batch[0][1]}
            try:
                outs = await asyncio.get_running_loop().run_in_executor(self.executor, self.model.run, feeds, names)
            except Exception as exc:
                for b in batch:
                    if not b[3].done():
                        b[3].set_exception(exc)
                return
            if any(o.shape[:1] != (sum(counts),) for o in outs):
                err = RuntimeError("an output's batch axis does not match the stacked inputs")
                for b in batch:
                    b[3].set_exception(err)
                return
            cuts = np.cumsum(counts)[:-1]
            parts = [np.split(o, cuts) for o in outs]
            for i, b in enumerate(batch):
                if not b[3].done():  # the client may have gone away
                    b[3].set_result([p[i] for p in parts])
        finally:
            self.slots.release()


def rows_independent(model, rows: int = 3) -> bool:
    """Does row i of the output depend only on row i of the input? (Needed for dynamic batching.)
    Checked once on random inputs: the stacked run must equal the per-row runs."""
    if any(t.shape[:1] != [-1] for t in model.inputs + model.outputs):
        return False
    rng = np.random.default_rng(0)
    feeds = {}
    for t in model.inputs:
        if -1 in t.shape[1:] or t.datatype not in ("FP32", "FP16", "FP64"):
            return False
        feeds[t.name] = rng.standard_normal([rows] + t.shape[1:]).astype(V2_TO_NP[t.datatype])
    names = [t.name for t in model.outputs]
    try:
        together = model.run(feeds, names)
        alone = [model.run({k: v[i:i + 1] for k, v in feeds.items()}, names) for i in range(rows)]
    except Exception:
        return False
    for j, out in enumerate(together):
        if out.shape[0] != rows:
            return False
        for i in range(rows):
            if not np.allclose(out[i:i + 1], alone[i][j], rtol=1e-4, atol=1e-5):
                return False
    return True
