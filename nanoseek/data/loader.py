"""A memory-mapped, packed loader: the token shards are one long stream cut into windows of seq_len + 1 tokens.

Each epoch visits every window once in an order drawn from (seed, epoch). A global batch is `world × batch` windows;
rank r takes its own `batch` of them, so N ranks see together exactly what one process with N× the batch sees. The
position (epoch, cursor) is the whole state: `state_dict` / `load_state_dict` resume it exactly.
"""

from pathlib import Path

import numpy as np
import torch

from nanoseek.errors import NanoseekError


class TokenStream:
    """The shards of a split as one read-only array, without concatenating them in memory."""

    def __init__(self, data_dir, files: list[str], dtype: str):
        self.maps = [np.memmap(Path(data_dir) / f, dtype=dtype, mode="r") for f in files]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.total = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out, pos = [], start
        while length > 0:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            off = pos - int(self.starts[i])
            take = min(length, len(self.maps[i]) - off)
            out.append(np.asarray(self.maps[i][off:off + take]))
            pos, length = pos + take, length - take
        return np.concatenate(out) if len(out) > 1 else out[0]


class WindowOrder:
    """The order in which a loader visits its n_windows windows: a permutation drawn from (seed, epoch), cut into
    global batches of `world × batch`, rank r taking its own `batch`; (epoch, cursor) is the whole state."""

    changed = "the data changed since the checkpoint (a different number of windows); resume with the same data"

    def __init__(self, n_windows: int, batch: int, rank: int, world: int, seed: int, shuffle: bool):
        self.n_windows, self.batch, self.rank, self.world = n_windows, batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor, self._order = 0, 0, None

    def order(self) -> np.ndarray:
        if self._order is None:
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
                           if self.shuffle else np.arange(self.n_windows))
        return self._order

    def next_indices(self) -> np.ndarray:
        """This rank's windows of the next global batch (a new epoch starts when one no longer fits)."""
        g = self.batch * self.world
        if self.cursor + g > self.n_windows:  # drop the ragged tail; start a new epoch
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        idx = self.order()[self.cursor + self.rank * self.batch: self.cursor + (self.rank + 1) * self.batch]
        self.cursor += g
        return idx

    def rewind(self) -> None:
        """Back to the first batch of the first epoch (evaluation passes start here every time)."""
        self.epoch, self.cursor, self._order = 0, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_windows", self.n_windows) != self.n_windows:
            raise NanoseekError(self.changed)
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
        self._order = None


class PackedLoader(WindowOrder):
    changed = ("the data changed since the checkpoint (a different number of windows); "
               "resume with the same --data and --seq-len")

    def __init__(self, data_dir, meta: dict, split: str, seq_len: int, batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if split not in meta["splits"]:
            raise NanoseekError(f"the data has no '{split}' split")
        self.stream = TokenStream(data_dir, meta["splits"][split]["files"], meta["dtype"])
        self.seq_len = seq_len
        super().__init__((self.stream.total - 1) // seq_len, batch, rank, world, seed, shuffle)
        if self.n_windows < batch * world:
            raise NanoseekError(f"the '{split}' split has {self.stream.total} tokens: too few for one batch of "
                                f"{batch * world} x {seq_len + 1} tokens (lower --batch-size / --seq-len or add data)")

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: inputs and targets, [batch, seq_len] int64."""
        idx = self.next_indices()
        rows = np.stack([self.stream.read(int(i) * self.seq_len, self.seq_len + 1) for i in idx]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]
