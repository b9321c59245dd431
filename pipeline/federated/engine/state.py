"""Private state of a shard of users, stored compactly (DESIGN "State stays where it lives").

Personal item tables are `base + sparse rows`: with plain SGD a client only changes the rows
it touched, so storing the touched rows is exact.

Shapes: U = users of the shard (local index = position in `users`), I = items, d = dim.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.base import InitialState


class SparseRows:
    """Rows of per-user item tables keyed by local_user * I + item.

    keys: [nnz] sorted int64.  values: [nnz, d].
    """

    def __init__(self, n_items: int, dim: int, dtype=torch.float32, device="cpu"):
        self.n_items = n_items
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.values = torch.zeros(0, dim, dtype=dtype, device=device)

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(found [R] bool, positions [R]) of `keys` in the store."""
        if self.keys.numel() == 0:
            return (torch.zeros(len(keys), dtype=torch.bool, device=keys.device),
                    torch.zeros(len(keys), dtype=torch.int64, device=keys.device))
        pos = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        return self.keys[pos] == keys, pos

    def read(self, keys: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """[R, d]: stored rows where present, `fallback` [R, d] elsewhere."""
        found, pos = self.lookup(keys)
        out = fallback.clone()
        at = torch.nonzero(found).squeeze(1)
        out[at] = self.values.index_select(0, pos.index_select(0, at))
        return out

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Insert or overwrite rows (keys unique). Costs O(stored + R log R): the new rows are
        sorted and merged in, the stored ones are never re-sorted."""
        values = values.to(self.values.dtype)
        if len(keys) > 1 and not bool((keys[1:] > keys[:-1]).all()):
            order = torch.argsort(keys)
            keys, values = keys[order], values[order]
        if len(self.keys) == 0:  # the store takes the given tensors (callers pass fresh ones)
            self.keys, self.values = keys, values
            return
        found, pos = self.lookup(keys)
        self.values[pos[found]] = values[found]
        new = ~found
        if not bool(new.any()):
            return
        new_keys, new_values = (keys, values) if not bool(found.any()) else (keys[new], values[new])
        # merged position: own rank + how many rows of the other side sort before it
        device = self.keys.device
        old_at = torch.arange(len(self.keys), device=device) + torch.searchsorted(new_keys, self.keys)
        new_at = torch.arange(len(new_keys), device=device) + torch.searchsorted(self.keys, new_keys)
        merged_keys = self.keys.new_empty(len(self.keys) + len(new_keys))
        merged_values = self.values.new_empty(len(merged_keys), self.values.shape[1])
        merged_keys[old_at], merged_keys[new_at] = self.keys, new_keys
        merged_values[old_at], merged_values[new_at] = self.values, new_values
        self.keys, self.values = merged_keys, merged_values

    def drop_users(self, local_users: torch.Tensor) -> None:
        """Forget every row of these users."""
        keep = ~torch.isin(self.keys // self.n_items, local_users)
        self.keys, self.values = self.keys[keep], self.values[keep]

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), "values": self.values.cpu()}

    def load_state_dict(self, state: dict) -> None:
        device = self.keys.device
        self.keys, self.values = state["keys"].to(device), state["values"].to(device)


class PersonalStore:
    """Personal parameters of the users of one shard, stacked, on `device`.

    dense: name -> [U, ...] (heads, NCF user vectors).
    tables: name -> SparseRows over `table_base[name]` [I, d] (FedRAP P_u), each user's rows read
        as table_scale[name][u] * (stored row, else the base): weight decay scales a whole table,
        and does so by one number per user (created on the first scale_table).
    copies: name -> {round r: SparseRows} the last trained copy of global table `name`
        (PFedRec Q~_u) of every user who last trained in round r, whose untouched rows equal
        `snapshots[r][name]`; copy_round[u] = r (-1 = never trained). A round's copies are one
        segment, written once: a new round appends a segment (no merge of the whole store);
        rows of users who trained again are dropped when they are over half of a segment.
    """

    def __init__(self, model, initial: InitialState, users: np.ndarray, n_items: int, dtype=torch.float32,
                 device="cpu", keep_copies: bool = True):
        self.users = np.asarray(users, dtype=np.int64)
        self.n_items = n_items
        self.device = torch.device(device)
        n = len(self.users)
        self.dense = {}
        for name, value in initial.personal_shared.items():
            self.dense[name] = value.to(device=device, dtype=dtype).expand(n, *value.shape).clone()
        for name, table in initial.personal_per_user.items():
            self.dense[name] = table[torch.as_tensor(self.users)].to(device=device, dtype=dtype).clone()
        self.table_base = {name: base.to(device=device, dtype=dtype) for name, base in initial.personal_table_base.items()}
        self.tables = {name: SparseRows(n_items, base.shape[1], dtype, device)
                       for name, base in self.table_base.items()}
        self.table_scale: dict[str, torch.Tensor] = {}
        # keep_copies=False: nothing reads the trained copies (PFedRec evaluated on the current Q)
        self.copy_names = tuple(model.KEEP_TRAINED_COPY) if keep_copies else ()
        self.copy_dims = {name: initial.global_params[name].shape[1] for name in self.copy_names}
        self.dtype = dtype
        self.copies: dict[str, dict[int, SparseRows]] = {name: {} for name in self.copy_names}
        self.copy_round = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.segment_users: dict[int, int] = {}  # round -> users its segment was written for
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.copy_scale: dict[str, torch.Tensor] = {}  # weight decay: name -> [U] factor of untouched rows

    def local_index(self, users: np.ndarray) -> np.ndarray:
        """Positions of global user ids in this shard (all must belong to it)."""
        pos = np.searchsorted(self.users, users)
        if (pos >= len(self.users)).any() or (self.users[np.minimum(pos, len(self.users) - 1)] != users).any():
            raise KeyError("user not in this shard")
        return pos

    def table_rows(self, name: str, local: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[R, d] personal table `name` at (local user, item) pairs."""
        rows = self.tables[name].read(local * self.n_items + item, self.table_base[name].index_select(0, item))
        if name in self.table_scale:
            rows.mul_(self.table_scale[name].index_select(0, local)[:, None])
        return rows

    def write_table(self, name: str, local: torch.Tensor, item: torch.Tensor, values: torch.Tensor) -> None:
        """Set personal table `name` at (local user, item) pairs (keys unique) to `values` [R, d]."""
        if name in self.table_scale:
            values = values / self.table_scale[name].index_select(0, local)[:, None]
        self.tables[name].write(local * self.n_items + item, values)

    def scale_table(self, name: str, local: torch.Tensor, factor: torch.Tensor) -> None:
        """Multiply the whole personal table `name` of users `local` by factor [len(local)]."""
        if name not in self.table_scale:
            self.table_scale[name] = torch.ones(len(self.users), dtype=torch.float64, device=self.device)
        self.table_scale[name][local] *= factor.to(torch.float64)

    def copy_rows(self, name: str, local: torch.Tensor, item: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """[R, d] the users' trained copies of global table `name`; `current` [I, d] is the
        table users who never trained fall back to."""
        out = current.index_select(0, item)
        rounds = self.copy_round[local]
        for round_ in torch.unique(rounds[rounds >= 0]).tolist():
            at = torch.nonzero(rounds == round_).squeeze(1)
            items = item.index_select(0, at)
            fallback = self.snapshots[round_][name].index_select(0, items).to(out.dtype)
            if name in self.copy_scale:  # weight decay scaled the rows the user never touched
                fallback.mul_(self.copy_scale[name].index_select(0, local.index_select(0, at)).to(out.dtype)[:, None])
            out[at] = self.copies[name][round_].read(local.index_select(0, at) * self.n_items + items, fallback)
        return out

    def save_copies(self, round_: int, global_tables: dict[str, torch.Tensor], local: torch.Tensor,
                    ws_local: torch.Tensor, ws_item: torch.Tensor, trained: dict[str, torch.Tensor],
                    scale: dict[str, torch.Tensor] | None = None) -> None:
        """Users `local` trained in `round_` from `global_tables`; keep their trained copies
        (trained: name -> [W, d] rows at (ws_local, ws_item); the store takes the tensors).
        scale: name -> [len(local)] factor of the rows they did not touch (weight decay)."""
        if not self.copy_names:
            return
        for name in (scale or {}):
            if name in self.copy_names:
                if name not in self.copy_scale:
                    self.copy_scale[name] = torch.ones(len(self.users), dtype=torch.float64, device=self.device)
                self.copy_scale[name][local] = scale[name].to(torch.float64)
        self.snapshots[round_] = {name: global_tables[name].to(device=self.device) for name in self.copy_names}
        for name in self.copy_names:
            segment = SparseRows(self.n_items, self.copy_dims[name], self.dtype, self.device)
            segment.write(ws_local * self.n_items + ws_item, trained[name])
            self.copies[name][round_] = segment
        self.copy_round[local] = round_
        self.segment_users[round_] = len(local)
        live = torch.bincount(self.copy_round[self.copy_round >= 0], minlength=round_ + 1).tolist()
        for old in list(self.segment_users):
            if live[old] == 0:  # nobody's copy is in that segment any more
                del self.segment_users[old], self.snapshots[old]
                for name in self.copy_names:
                    del self.copies[name][old]
            elif 2 * live[old] < self.segment_users[old]:  # mostly rows of users who trained again
                for name in self.copy_names:
                    segment = self.copies[name][old]
                    keep = self.copy_round.index_select(0, segment.keys // self.n_items) == old
                    segment.keys, segment.values = segment.keys[keep], segment.values[keep]
                self.segment_users[old] = live[old]

    def copy_rows_stored(self) -> int:
        """Rows held by the trained copies (all names, all segments)."""
        return sum(len(segment.keys) for segments in self.copies.values() for segment in segments.values())

    def state_dict(self) -> dict:
        """Everything, in host memory."""
        return {"users": self.users, "dense": {k: v.cpu() for k, v in self.dense.items()},
                "tables": {k: v.state_dict() for k, v in self.tables.items()},
                "copies": {k: {r: seg.state_dict() for r, seg in segs.items()} for k, segs in self.copies.items()},
                "copy_round": self.copy_round.cpu(), "segment_users": dict(self.segment_users),
                "snapshots": {r: {k: v.cpu() for k, v in snap.items()} for r, snap in self.snapshots.items()},
                "table_scale": {k: v.cpu() for k, v in self.table_scale.items()},
                "copy_scale": {k: v.cpu() for k, v in self.copy_scale.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not np.array_equal(state["users"], self.users):
            raise ValueError("checkpoint belongs to another shard of users")
        device = self.device
        self.dense = {k: v.to(device) for k, v in state["dense"].items()}
        for name, sub in state["tables"].items():
            self.tables[name].load_state_dict(sub)
        self.copies = {name: {} for name in self.copy_names}
        for name, segments in state["copies"].items():
            for round_, sub in segments.items():
                segment = SparseRows(self.n_items, self.copy_dims[name], self.dtype, device)
                segment.load_state_dict(sub)
                self.copies[name][round_] = segment
        self.copy_round = state["copy_round"].to(device)
        self.segment_users = dict(state["segment_users"])
        self.snapshots = {r: {k: v.to(device) for k, v in snap.items()} for r, snap in state["snapshots"].items()}
        self.table_scale = {k: v.to(device) for k, v in state.get("table_scale", {}).items()}
        self.copy_scale = {k: v.to(device) for k, v in state.get("copy_scale", {}).items()}
