"""Private state of a shard of users, stored compactly (DESIGN "State stays where it lives").

Personal item tables are `base + sparse rows`: with plain SGD a client only changes the rows
it touched, so storing the touched rows is exact (spec/backbones.md §7).

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

    def __init__(self, n_items: int, dim: int, dtype=torch.float32):
        self.n_items = n_items
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.values = torch.zeros(0, dim, dtype=dtype)

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(found [R] bool, positions [R]) of `keys` in the store."""
        if self.keys.numel() == 0:
            return torch.zeros(len(keys), dtype=torch.bool), torch.zeros(len(keys), dtype=torch.int64)
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
        old_at = torch.arange(len(self.keys)) + torch.searchsorted(new_keys, self.keys)
        new_at = torch.arange(len(new_keys)) + torch.searchsorted(self.keys, new_keys)
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
        return {"keys": self.keys, "values": self.values}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.values = state["keys"], state["values"]


class PersonalStore:
    """Personal parameters of the users of one shard, stacked.

    dense: name -> [U, ...] (heads, NCF user vectors).
    tables: name -> SparseRows over `table_base[name]` [I, d] (FedRAP P_u).
    copies: name -> SparseRows of the last trained copy of global table `name` (PFedRec Q~_u),
        whose untouched rows equal `snapshots[copy_round[u]][name]`; copy_round -1 = never trained.
    """

    def __init__(self, model, initial: InitialState, users: np.ndarray, n_items: int, dtype=torch.float32):
        self.users = np.asarray(users, dtype=np.int64)
        self.n_items = n_items
        n = len(self.users)
        self.dense = {}
        for name, value in initial.personal_shared.items():
            self.dense[name] = value.to(dtype).expand(n, *value.shape).clone()
        for name, table in initial.personal_per_user.items():
            self.dense[name] = table[torch.as_tensor(self.users)].to(dtype).clone()
        self.table_base = {name: base.to(dtype) for name, base in initial.personal_table_base.items()}
        self.tables = {name: SparseRows(n_items, base.shape[1], dtype) for name, base in self.table_base.items()}
        copy_names = getattr(model, "KEEP_TRAINED_COPY", ())
        dim = {name: initial.global_params[name].shape[1] for name in copy_names}
        self.copies = {name: SparseRows(n_items, dim[name], dtype) for name in copy_names}
        self.copy_round = torch.full((n,), -1, dtype=torch.int64)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def local_index(self, users: np.ndarray) -> np.ndarray:
        """Positions of global user ids in this shard (all must belong to it)."""
        pos = np.searchsorted(self.users, users)
        if (pos >= len(self.users)).any() or (self.users[np.minimum(pos, len(self.users) - 1)] != users).any():
            raise KeyError("user not in this shard")
        return pos

    def table_rows(self, name: str, local: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[R, d] personal table `name` at (local user, item) pairs."""
        return self.tables[name].read(local * self.n_items + item, self.table_base[name].index_select(0, item))

    def copy_rows(self, name: str, local: torch.Tensor, item: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """[R, d] the users' trained copies of global table `name`; `current` [I, d] is the
        table users who never trained fall back to."""
        fallback = current.index_select(0, item)
        rounds = self.copy_round[local]
        for round_ in torch.unique(rounds[rounds >= 0]).tolist():
            at = rounds == round_
            fallback[at] = self.snapshots[round_][name][item[at]].to(fallback.dtype)
        return self.copies[name].read(local * self.n_items + item, fallback)

    def save_copies(self, round_: int, global_tables: dict[str, torch.Tensor], local: torch.Tensor,
                    ws_local: torch.Tensor, ws_item: torch.Tensor, trained: dict[str, torch.Tensor]) -> None:
        """Users `local` trained in `round_` from `global_tables`; keep their trained copies."""
        if not self.copies:
            return
        self.snapshots[round_] = {name: global_tables[name] for name in self.copies}
        for name, store in self.copies.items():
            store.drop_users(local)
            store.write(ws_local * self.n_items + ws_item, trained[name])
        self.copy_round[local] = round_
        referenced = set(torch.unique(self.copy_round).tolist())
        for old in [r for r in self.snapshots if r not in referenced]:
            del self.snapshots[old]

    def state_dict(self) -> dict:
        return {"users": self.users, "dense": self.dense,
                "tables": {k: v.state_dict() for k, v in self.tables.items()},
                "copies": {k: v.state_dict() for k, v in self.copies.items()},
                "copy_round": self.copy_round, "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        if not np.array_equal(state["users"], self.users):
            raise ValueError("checkpoint belongs to another shard of users")
        self.dense = state["dense"]
        for name, sub in state["tables"].items():
            self.tables[name].load_state_dict(sub)
        for name, sub in state["copies"].items():
            self.copies[name].load_state_dict(sub)
        self.copy_round, self.snapshots = state["copy_round"], state["snapshots"]
