"""What `cdm status` reports: the store's settings, sources, compartments and their models'
states, the paragon and router, and the users of its policy. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict

from ..sampling.policy import store_policy
from ..store.recipes import adapter_config, latent_config, recipe_fields, text_config, train_config
from ..store.registry import BASE, ENCODER, PARAGON, ROUTER, Store
from ..training.kinds import model_state


def status(store: Store) -> dict:
    cfg = store.config
    counts, hist, names = store.counts(), store.label_counts(), store.label_names()
    comps = {}
    for c, src in store.compartments().items():
        row = store.model(c)
        comps[c] = dict(source=src, items=counts.get(c, 0), model=model_state(store, c),
                        digest=row.digest if row else None,
                        labels={("-" if k is None else names[k]): v for k, v in sorted(hist.get(c, {}).items(),
                                                                                       key=lambda kv: (kv[0] is None, kv[0] or 0))})
    models = {}
    for special in (PARAGON, ROUTER):
        row = store.model(special)
        models[special] = dict(state=model_state(store, special) if counts else "missing",
                               digest=row.digest if row else None)
    hist_all: dict[str, int] = {}
    for c in hist.values():
        for k, v in c.items():
            key = "-" if k is None else names[k]
            hist_all[key] = hist_all.get(key, 0) + v
    pol, users = store_policy(store), {}
    missing = pol.missing(store) if pol else {}
    for u in sorted(pol.users) if pol else []:
        allowed = pol.allowed(store, u)
        users[u] = dict(compartments=allowed, restricted=len(allowed) < len(comps))
        if u in missing:
            users[u]["missing"] = missing[u]  # names that grant nothing (forgotten or never ingested)
    a = adapter_config(store)
    adapters = None if a is None else dict(asdict(a), public=list(a.public), base=model_state(store, BASE))
    t = text_config(store)
    return dict(store=str(store.root), config=asdict(cfg), train=recipe_fields(train_config(store)), policy=users or None,
                adapters=adapters, text=None if t is None else dict(asdict(t), public=list(t.public), **(
                    {"encoder": model_state(store, ENCODER)} if t.public else {})),
                latent=None if latent_config(store) is None else asdict(latent_config(store)),
                sources=store.sources(), items=sum(counts.values()), labels=hist_all, compartments=comps,
                paragon=models[PARAGON], router=dict(
                    **models[ROUTER],
                    note="the classifier router is trained on every compartment's data: a restricted composition "
                         "using it still reads a network fit to compartments outside the allowed set; "
                         "the ito router holds no data"))
