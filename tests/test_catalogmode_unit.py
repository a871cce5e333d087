"""Catalog mode's load rules without Triton: the load timeout, shared loads, failures that are
remembered and retried, the budget's choice of what to unload (busy and pinned models stay)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from bioengine_core.catalogmode import CatalogMode, CatalogSettings
from bioengine_core.errors import InferenceError, ModelError, UnknownModelError


class FakeCatalog:
    """What CatalogMode uses of ModelCatalog; `prepare_ref` sleeps `delay` s or raises."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None):
        self.models: dict[str, SimpleNamespace] = {}
        self.delay = delay
        self.fail = fail
        self.prepared: list[str] = []

    def listing(self, scheme: str) -> list[dict]:
        return [{"id": f"m{i}", "name": f"M{i}", "tags": ["t"]} for i in range(6)]

    def prepare_ref(self, scheme: str, model_id: str, *, shared_runner: bool = False):
        self.prepared.append(model_id)
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return SimpleNamespace(id=model_id, inflight=0, package=SimpleNamespace(tags=[]))

    def add(self, served, replace: bool = False) -> None:
        self.models[served.id] = served

    def remove(self, model_id: str) -> None:
        self.models.pop(model_id, None)

    def ids(self) -> list[str]:
        return sorted(self.models)

    def infos(self) -> list:
        return []


class FakeSupervisor:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    async def broadcast(self, model_id: str, action: str) -> None:
        self.calls.append((action, model_id))

    async def respec(self) -> None:
        pass


def mode(catalog: FakeCatalog, pinned: set[str] = frozenset(), **settings) -> CatalogMode:
    lines: list[str] = []
    m = CatalogMode(
        CatalogSettings(enabled=True, **settings),
        catalog=catalog,  # type: ignore[arg-type]
        supervisor=FakeSupervisor(),  # type: ignore[arg-type]
        pinned=lambda: set(pinned),
        say=lines.append,
    )
    m.lines = lines  # type: ignore[attr-defined]
    return m


async def test_concurrent_first_requests_share_one_load():
    catalog = FakeCatalog(delay=0.3)
    m = mode(catalog)
    await asyncio.gather(*(m.ensure("m1") for _ in range(10)))
    assert catalog.prepared == ["m1"] and "m1" in catalog.models
    assert m.supervisor.calls == [("load", "m1")]  # type: ignore[attr-defined]


async def test_a_slow_load_answers_503_and_goes_on():
    catalog = FakeCatalog(delay=0.6)
    m = mode(catalog, load_timeout=0.1)
    with pytest.raises(InferenceError) as info:
        await m.ensure("m2")
    assert info.value.status == 503 and "still loading after 0.1 s" in str(info.value)
    assert "[catalog] load_timeout" in str(info.value)
    await asyncio.sleep(0.8)
    await m.ensure("m2")  # the load finished meanwhile
    assert catalog.prepared == ["m2"]


async def test_failures_are_remembered_until_retry_failed_after():
    catalog = FakeCatalog(fail=ModelError("bioimageio:m3: weights.onnx: sha256 mismatch"))
    m = mode(catalog, retry_failed_after=0.3)
    for _ in range(2):
        with pytest.raises(InferenceError) as info:
            await m.ensure("m3")
        assert info.value.status == 503 and "weights.onnx: sha256 mismatch" in str(info.value)
    assert catalog.prepared == ["m3"], "the second request got the remembered failure"
    assert m.rows()["models"][0]["state"] == "failed"
    await asyncio.sleep(0.35)
    catalog.fail = None
    await m.ensure("m3")
    assert catalog.prepared == ["m3", "m3"] and m.rows()["models"][0]["state"] == "ready"


async def test_an_id_the_zoo_lacks_is_404_and_a_denied_one_never_loads():
    m = mode(FakeCatalog(fail=UnknownModelError("bioimageio:m4: no such model in the zoo")))
    with pytest.raises(InferenceError) as info:
        await m.ensure("m4")
    assert info.value.status == 404 and "no such model in the zoo" in str(info.value)
    denied = mode(FakeCatalog(), allow=["tag:t"], deny=["m5"])
    for model_id in ("m5", "zz"):  # denied; not in the listing, so without the tag
        with pytest.raises(InferenceError) as info:
            await denied.ensure(model_id)
        assert info.value.status == 404 and "not offered by this site's catalog" in str(info.value)
    assert denied.catalog.prepared == []  # type: ignore[attr-defined]


async def test_the_budget_unloads_the_least_recently_used_idle_unpinned_model():
    catalog = FakeCatalog()
    m = mode(catalog, pinned={"m0"}, max_loaded=3)
    for model_id in ("m0", "m1", "m2"):
        await m.ensure(model_id)
    catalog.models["m1"].inflight = 1  # busy: never unloaded
    await m.ensure("m0")  # pinned and used: stays anyway
    await m.ensure("m3")
    assert sorted(catalog.models) == ["m0", "m1", "m3"]
    assert any("model m2: unloaded (least recently used" in line for line in m.lines)  # type: ignore[attr-defined]
    catalog.models["m3"].inflight = 1
    await m.ensure("m4")  # every other loaded model is pinned or busy: over budget, said so
    assert len(catalog.models) == 4
    assert any("every loaded model is pinned or busy" in line for line in m.lines)  # type: ignore[attr-defined]


async def test_search_covers_models_not_loaded_and_respects_the_allow_list():
    m = mode(FakeCatalog(), allow=["m1", "m2"])
    await m.refresh_listing()
    assert [r["id"] for r in m.search("")] == ["m1", "m2"]
    assert [r["state"] for r in m.search("M2")] == ["available"]
    await m.ensure("m2")
    assert [r["state"] for r in m.search("M2")] == ["ready"]
