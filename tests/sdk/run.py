#!/usr/bin/env python3
"""SDK conformance suite: drives harvestd's emulator with the providers'
official Python SDKs (firecrawl-py 4.55.0, brightdata-sdk 2.5.2, pinned in
requirements.txt) so a change that makes the emulator answer differently
from what the real clients expect is noticed.

    python tests/sdk/run.py http://127.0.0.1:PORT [CHECK ...]

The emulator must be running, freshly started, with tests/sdk/scenario.toml
(its [[faults]] entry is spent by the first check). Prints one line per
check, "ok <name>" or "FAIL <name>: <why>", and exits 0 only if every
check passed. Naming checks runs only those (in suite order).

Checks named weakness_* assert that a known SDK weakness is still there;
one failing means the SDK changed (fixed, or failing differently): update
the check and README.md. A failure whose text starts "EMULATOR DIVERGENCE"
is the emulator answering otherwise than upstream, as the SDK expects.

SDK_CHECK_TIMES=1 prints each check's duration on stderr;
SDK_CHECK_TRACEBACK=1 prints a failed check's traceback.
"""

import asyncio
import collections
import os
import sys
import time
import traceback
import uuid

# --- Nothing may leave loopback -------------------------------------------
# Every base URL the SDKs know is re-pointed below; as a guard against one
# this suite missed, any request to a non-loopback host goes to a proxy that
# does not exist and fails at once. requests, httpx and aiohttp (trust_env)
# all honour these.
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ[_name] = "http://127.0.0.1:9"
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = "127.0.0.1,localhost"
# The SDKs read these when no key is passed; none must come from the host.
for _name in ("FIRECRAWL_API_KEY", "FIRECRAWL_API_URL", "BRIGHTDATA_API_TOKEN", "BRIGHTDATA_API_KEY"):
    os.environ.pop(_name, None)

import requests  # noqa: E402  (after the environment is set)

import firecrawl  # noqa: E402
from firecrawl import AsyncFirecrawl, Firecrawl, V1FirecrawlApp  # noqa: E402
from firecrawl.v2.types import (  # noqa: E402
    AuditMetadata,
    Location,
    PaginationConfig,
    ThreatProtectionOptions,
    WaitAction,
)
from firecrawl.v2.types import ScrapeOptions as V2ScrapeOptions  # noqa: E402
from firecrawl.v2.utils.error_handler import (  # noqa: E402
    BadRequestError,
    FirecrawlError,
    UnauthorizedError,
)

import brightdata  # noqa: E402
import brightdata.scraper_studio.client as studio_client  # noqa: E402
from brightdata import BrightDataClient  # noqa: E402
from brightdata.core.engine import AsyncEngine  # noqa: E402
from brightdata.datasets.base import BaseDataset  # noqa: E402
from brightdata.datasets.client import DatasetsClient  # noqa: E402
from brightdata.exceptions import AuthenticationError  # noqa: E402
from brightdata.scrapers.api_client import DatasetAPIClient  # noqa: E402
from brightdata.scrapers.base import BaseWebScraper  # noqa: E402

FIRECRAWL_VERSION = "4.55.0"
BRIGHTDATA_VERSION = "2.5.2"

FC_KEY = "fc-demo-firecrawl-token"
BD_TOKEN = "demo-brightdata-token"

# Must match scenario.toml.
FC_PAGE_DOCS = 40
FC_BUILD = 2.0  # seconds
FAIL_MESSAGE = "sdkcheck: emulated collection failure (target blocked)"

URL = ""  # the emulator, from argv


# --- Helpers -----------------------------------------------------------------

def emu(method, path, **kw):
    """A request to the emulator outside any SDK (controls, raw reads)."""
    r = requests.request(method, URL + path, timeout=30, **kw)
    return r


def bd_raw(path, **kw):
    return emu("GET", path, headers={"Authorization": f"Bearer {BD_TOKEN}"}, **kw)


def stats():
    return emu("GET", "/_emulator/stats").json()


def ledger():
    return emu("GET", "/_emulator/ledger").json()


def requests_to(endpoint):
    return stats()["requests"].get(endpoint, 0)


def urls(prefix, n):
    return [f"https://{prefix}/page-{i}.html" for i in range(n)]


def expect_raise(exc_type, fn, *a, **kw):
    try:
        result = fn(*a, **kw)
    except exc_type as e:
        return e
    raise AssertionError(f"expected {exc_type.__name__}, got a result: {result!r}")


async def expect_raise_async(exc_type, coro):
    try:
        result = await coro
    except exc_type as e:
        return e
    raise AssertionError(f"expected {exc_type.__name__}, got a result: {result!r}")


def each_once(got, want, what):
    counts = collections.Counter(got)
    dup = sorted(u for u, c in counts.items() if c > 1)
    missing = sorted(set(want) - set(counts))
    extra = sorted(set(counts) - set(want))
    assert not (dup or missing or extra), (
        f"{what}: {len(got)} documents for {len(want)} URLs; "
        f"duplicated {dup[:3]} ({len(dup)}), missing {missing[:3]} ({len(missing)}), "
        f"unexpected {extra[:3]} ({len(extra)})"
    )


def wait_until(pred, timeout, step=0.2, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def point_brightdata_at(url):
    """brightdata-sdk 2.5.2 has no base-URL option: its only seam is the
    attributes holding https://api.brightdata.com. Re-point all of them."""
    DatasetAPIClient.TRIGGER_URL = f"{url}/datasets/v3/trigger"
    DatasetAPIClient.STATUS_URL = f"{url}/datasets/v3/progress"
    DatasetAPIClient.RESULT_URL = f"{url}/datasets/v3/snapshot"
    AsyncEngine.BASE_URL = url
    # Scraper Studio keeps its base in a module global, not a class attribute.
    studio_client.BASE_URL = url
    # Not used by these checks; re-pointed so nothing can reach the real API.
    DatasetsClient.BASE_URL = url
    BaseDataset.BASE_URL = url


def scraper_for(dataset_id, token=BD_TOKEN):
    """A Web Scraper API scraper for one dataset, as the SDK's own platform
    scrapers are made (a BaseWebScraper with a DATASET_ID)."""
    cls = type(
        f"SdkCheck_{dataset_id}",
        (BaseWebScraper,),
        {"DATASET_ID": dataset_id, "PLATFORM_NAME": "sdkcheck", "MIN_POLL_TIMEOUT": 30},
    )
    return cls(bearer_token=token)


def studio_trigger(collector, inputs):
    """Scraper Studio batch trigger. brightdata-sdk has none (it only has
    the real-time /dca/trigger_immediate, which the emulator does not
    serve), so the job is made with a plain request."""
    r = emu(
        "POST",
        "/dca/trigger",
        params={"collector": collector},
        json=inputs,
        headers={"Authorization": f"Bearer {BD_TOKEN}"},
    )
    assert r.status_code == 200, f"/dca/trigger: {r.status_code} {r.text[:200]}"
    return r.json()["collection_id"]


# --- Firecrawl (firecrawl-py v2) -----------------------------------------------

def check_weakness_firecrawl_v2_partial_completed_on_429():
    """firecrawl-py v2 stops paging at a failed page fetch (here a 429) and
    returns what it has as a `completed` job, without error."""
    before = stats()
    if before["requests"].get("fc_status", 0) != 0 or before["rate_limited"] != 0:
        raise AssertionError(
            "the scenario's fc_status fault is already spent: run against a freshly started "
            "emulator, with this check first"
        )
    fc = Firecrawl(api_key=FC_KEY, api_url=URL)
    want = urls("partial.example.com", 100)
    start = fc.start_batch_scrape(want, formats=["markdown"])
    # Finish the batch without a status read (the fault counts those): move
    # the emulator's clock past the build time.
    assert emu("POST", "/_emulator/clock", params={"advance": "5s"}).ok
    # Status read 1 passes (completed, first page, `next`); read 2, the SDK's
    # fetch of page 2, is the 429.
    job = fc.get_batch_scrape_status(start.id)
    after = stats()
    assert after["rate_limited"] == before["rate_limited"] + 1, f"no 429 was sent: {after}"
    assert job.total == 100 and job.completed == 100, f"total {job.total}, completed {job.completed}"
    assert job.status == "completed" and len(job.data) == FC_PAGE_DOCS, (
        "weakness gone? firecrawl-py now answers a 429 on a page fetch with "
        f"status={job.status!r} and {len(job.data)} of {job.total} documents "
        f"(was: 'completed' with the first page's {FC_PAGE_DOCS})"
    )


def check_firecrawl_v2_batch_scrape_250_paged():
    fc = Firecrawl(api_key=FC_KEY, api_url=URL)
    want = urls("v2.example.com", 250)
    reads_before = requests_to("fc_status")
    job = fc.batch_scrape(want, formats=["markdown"], poll_interval=1, wait_timeout=60)
    reads = requests_to("fc_status") - reads_before
    assert job.status == "completed", f"status {job.status!r}"
    assert job.total == 250 and job.completed == 250, f"total {job.total}, completed {job.completed}"
    assert job.next is None, f"next left after auto-pagination: {job.next}"
    got = [d.metadata.source_url for d in job.data]
    each_once(got, want, "batch_scrape")
    pages = -(-250 // FC_PAGE_DOCS)
    assert reads >= pages, f"only {reads} status reads: the {pages} pages were not all fetched"
    for d in job.data:
        assert d.markdown and f"Emulated content of {d.metadata.source_url}" in d.markdown, (
            f"markdown of {d.metadata.source_url}: {d.markdown[:80]!r}"
        )
        assert d.metadata.status_code == 200, f"statusCode {d.metadata.status_code}"
        assert d.metadata.scrape_id, "metadata.scrapeId missing"
    assert job.credits_used == 250, f"creditsUsed {job.credits_used}"
    assert job.expires_at is not None, "expiresAt not parsed"


def check_firecrawl_v2_start_status_errors_cancel():
    fc = Firecrawl(api_key=FC_KEY, api_url=URL)
    want = urls("cancel.example.com", 60)
    start = fc.start_batch_scrape(want, formats=["markdown"])
    assert start.id and start.url and start.id in start.url, f"start answer {start!r}"
    assert not start.invalid_urls, f"invalid_urls {start.invalid_urls}"

    job = fc.get_batch_scrape_status(start.id)
    assert job.status == "scraping", (
        f"status {job.status!r} right after start (build time {FC_BUILD}s): machine too slow?"
    )
    assert job.total == 60 and 0 <= job.completed < 60, f"total {job.total}, completed {job.completed}"
    seen = [d.metadata.source_url for d in job.data]
    assert len(seen) == len(set(seen)) and set(seen) <= set(want), "running pages repeat or stray"

    errs = fc.get_batch_scrape_errors(start.id)
    assert errs.errors == [] and errs.robots_blocked == [], f"errors while running: {errs}"

    assert fc.cancel_batch_scrape(start.id) is True, "cancel_batch_scrape did not say cancelled"

    job = fc.get_batch_scrape_status(start.id)
    assert job.status == "cancelled", f"status after cancel {job.status!r}"
    done = [d.metadata.source_url for d in job.data]
    assert len(done) == job.completed, f"{len(done)} documents, completed {job.completed}"

    errs = fc.get_batch_scrape_errors(start.id)
    failed = [e.url for e in errs.errors]
    assert failed, "no errors listed for the URLs the cancel cut"
    for e in errs.errors:
        assert e.error and e.id and e.timestamp is not None, f"error entry {e!r}"
    # Every URL is accounted for: a document or an error, never both.
    assert not set(done) & set(failed), f"both document and error: {sorted(set(done) & set(failed))[:3]}"
    each_once(done + failed, want, "documents + errors after cancel")

    e = expect_raise(FirecrawlError, fc.cancel_batch_scrape, start.id)
    assert e.status_code == 409, f"second cancel: {e.status_code} {e}"


def check_firecrawl_v2_invalid_urls():
    fc = Firecrawl(api_key=FC_KEY, api_url=URL)
    good, bad = "https://invalid.example.com/ok.html", "http://localhost:3000/x"
    e = expect_raise(BadRequestError, fc.start_batch_scrape, [good, bad], formats=["markdown"])
    assert e.status_code == 400, f"strict: {e.status_code} {e}"
    start = fc.start_batch_scrape([good, bad], formats=["markdown"], ignore_invalid_urls=True)
    assert start.id, f"lenient start {start!r}"
    assert start.invalid_urls == [bad], f"invalid_urls {start.invalid_urls!r}"


def check_firecrawl_v2_wrong_key_401():
    fc = Firecrawl(api_key="fc-not-a-key", api_url=URL)
    e = expect_raise(UnauthorizedError, fc.start_batch_scrape, urls("auth.example.com", 2))
    assert e.status_code == 401, f"start: {e.status_code} {e}"
    e = expect_raise(UnauthorizedError, fc.get_batch_scrape_status, str(uuid.uuid4()))
    assert e.status_code == 401, f"status: {e.status_code} {e}"


def check_firecrawl_v2_async_batch_scrape():
    async def run():
        fc = AsyncFirecrawl(api_key=FC_KEY, api_url=URL)
        want = urls("async.example.com", 120)
        job = await fc.batch_scrape(
            want, options=V2ScrapeOptions(formats=["markdown"]), poll_interval=1, timeout=60
        )
        assert job.status == "completed", f"status {job.status!r}"
        each_once([d.metadata.source_url for d in job.data], want, "async batch_scrape")

    asyncio.run(run())


def check_firecrawl_v2_manual_paging():
    """PaginationConfig(auto_paginate=False) + get_batch_scrape_status_page:
    the caller follows `next` itself, page by page."""
    fc = Firecrawl(api_key=FC_KEY, api_url=URL)
    want = urls("manual.example.com", 100)
    start = fc.start_batch_scrape(want, formats=["markdown"])
    manual = PaginationConfig(auto_paginate=False)
    first = wait_until(
        lambda: (lambda j: j if j.status == "completed" else None)(
            fc.get_batch_scrape_status(start.id, pagination_config=manual)
        ),
        timeout=FC_BUILD + 20,
        step=0.5,
        what="the batch to complete",
    )
    sizes = [len(first.data)]
    got = [d.metadata.source_url for d in first.data]
    page, pages = first, 1
    while page.next:
        page = fc.get_batch_scrape_status_page(page.next)
        sizes.append(len(page.data))
        got += [d.metadata.source_url for d in page.data]
        pages += 1
        assert pages <= 10, f"paging does not end: sizes {sizes}"
    assert sizes == [FC_PAGE_DOCS, FC_PAGE_DOCS, 100 - 2 * FC_PAGE_DOCS], f"page sizes {sizes}"
    each_once(got, want, "manual paging")


# Every option firecrawl-py's Firecrawl.start_batch_scrape / batch_scrape
# takes, one batch each. An option the emulator refuses as an unrecognized
# key, where upstream's v2 batch schema has it, is an emulator divergence.
# Left out: check_prompt_injection (top-level `checkPromptInjection`) and
# ScrapeOptions.domain_tools (`domainTools`): the SDK sends them, but the
# upstream schema we could read (firecrawl/firecrawl apps/api/src/controllers/
# v2/types.ts) has neither at the top level, so which side is right is open.
V2_SYNC_OPTIONS = {
    "formats": dict(formats=["markdown", "html", "rawHtml", "links", "summary"]),
    "json_format": dict(formats=[{"type": "json", "prompt": "title", "schema": {"type": "object", "properties": {"t": {"type": "string"}}}}]),
    "headers": dict(headers={"X-Sdk-Check": "1"}),
    "include_tags": dict(include_tags=["main"]),
    "exclude_tags": dict(exclude_tags=["nav"]),
    "only_main_content": dict(only_main_content=False),
    "timeout": dict(timeout=30000),
    "wait_for": dict(wait_for=100),
    "mobile": dict(mobile=True),
    "parsers": dict(parsers=["pdf"]),
    "actions": dict(actions=[WaitAction(milliseconds=100)]),
    "location": dict(location=Location(country="US")),
    "skip_tls_verification": dict(skip_tls_verification=True),
    "remove_base64_images": dict(remove_base64_images=False),
    "fast_mode": dict(fast_mode=True),
    "use_mock": dict(use_mock="sdkcheck"),
    "block_ads": dict(block_ads=False),
    "proxy": dict(proxy="basic"),
    "max_age": dict(max_age=0),
    "store_in_cache": dict(store_in_cache=False),
    "lockdown": dict(lockdown=True),
    "threat_protection": dict(threat_protection=ThreatProtectionOptions(mode="normal")),
    "audit_metadata": dict(audit_metadata=AuditMetadata(username="sdkcheck")),
    "webhook": dict(webhook="https://hooks.example.com/sdkcheck"),
    "max_concurrency": dict(max_concurrency=2),
    "zero_data_retention": dict(zero_data_retention=True),
    "integration": dict(integration="sdkcheck"),
    "ignore_invalid_urls": dict(ignore_invalid_urls=False),
}
# ScrapeOptions fields only reachable through options= (the async client).
V2_ASYNC_OPTIONS = {
    "redact_pii": V2ScrapeOptions(redact_pii=True),
    "profile": V2ScrapeOptions(profile={"name": "sdkcheck"}),
    "min_age": V2ScrapeOptions(min_age=1000),
}


def unrecognized(e):
    """The keys a 400 refused as unrecognized, or None."""
    try:
        body = e.response.json()
    except Exception:  # noqa: BLE001
        return None
    for d in body.get("details") or []:
        if isinstance(d, dict) and d.get("code") == "unrecognized_keys":
            return d.get("keys") or []
    return None


def check_firecrawl_v2_sdk_scrape_options_accepted():
    """EMULATOR DIVERGENCE while failing: upstream's v2 batch schema
    (baseScrapeOptions) has threatProtection, auditMetadata, redactPII and
    profile; firecrawl-py 4.55.0 sends them; the emulator's strict key list
    refuses them with 400 unrecognized_keys."""
    refused = {}
    one = ["https://options.example.com/page.html"]
    fc = Firecrawl(api_key=FC_KEY, api_url=URL)
    for name, kw in V2_SYNC_OPTIONS.items():
        try:
            fc.start_batch_scrape(one, **kw)
        except FirecrawlError as e:
            keys = unrecognized(e)
            refused[name] = keys if keys is not None else f"{e.status_code}: {e}"

    async def run():
        afc = AsyncFirecrawl(api_key=FC_KEY, api_url=URL)
        for name, opts in V2_ASYNC_OPTIONS.items():
            try:
                await afc.start_batch_scrape(one, options=opts)
            except FirecrawlError as e:
                keys = unrecognized(e)
                refused[name] = keys if keys is not None else f"{e.status_code}: {e}"

    asyncio.run(run())
    assert not refused, (
        "EMULATOR DIVERGENCE: POST /v2/batch/scrape refuses options firecrawl-py sends "
        "(and upstream's v2 schema has): "
        + "; ".join(f"{k} -> 400 unrecognized_keys {v}" for k, v in refused.items())
    )


# --- Firecrawl (firecrawl-py v1 client) -------------------------------------

def check_firecrawl_v1_batch_scrape_urls():
    app = V1FirecrawlApp(api_key=FC_KEY, api_url=URL)
    want = urls("v1.example.com", 100)
    job = app.batch_scrape_urls(want, formats=["markdown"], poll_interval=1)
    assert job.success and job.status == "completed", f"status {job.status!r}, error {job.error!r}"
    assert job.total == 100 and job.completed == 100, f"total {job.total}, completed {job.completed}"
    each_once([d.metadata["sourceURL"] for d in job.data], want, "batch_scrape_urls")
    assert all(d.markdown for d in job.data), "a document without markdown"


def check_firecrawl_v1_status_and_errors():
    app = V1FirecrawlApp(api_key=FC_KEY, api_url=URL)
    want = urls("v1status.example.com", 50)
    start = app.async_batch_scrape_urls(want, formats=["markdown"])
    assert start.success and start.id, f"start {start!r}"
    job = wait_until(
        lambda: (lambda j: j if j.status == "completed" else None)(app.check_batch_scrape_status(start.id)),
        timeout=FC_BUILD + 20,
        step=0.5,
        what="v1 status completed",
    )
    each_once([d.metadata["sourceURL"] for d in job.data], want, "check_batch_scrape_status")
    errs = app.check_batch_scrape_errors(start.id)
    assert errs.errors == [] and errs.robotsBlocked == [], f"errors {errs!r}"


def check_firecrawl_v1_idempotency_key_reused_409():
    app = V1FirecrawlApp(api_key=FC_KEY, api_url=URL)
    key = str(uuid.uuid4())
    first = app.async_batch_scrape_urls(urls("idem.example.com", 3), formats=["markdown"], idempotency_key=key)
    assert first.success and first.id, f"first {first!r}"
    e = expect_raise(
        requests.exceptions.HTTPError,
        app.async_batch_scrape_urls,
        urls("idem.example.com", 3),
        formats=["markdown"],
        idempotency_key=key,
    )
    assert e.response.status_code == 409, f"reuse: {e.response.status_code} {e}"
    assert "Conflict" in str(e), f"the SDK's 409 message: {e}"
    billed = [x for x in ledger() if x.get("name") == key]
    assert len(billed) == 1 and billed[0]["remote_id"] == first.id, f"ledger for the key: {billed}"


def check_firecrawl_v1_idempotency_key_spent_by_400():
    app = V1FirecrawlApp(api_key=FC_KEY, api_url=URL)
    key = str(uuid.uuid4())
    e = expect_raise(
        requests.exceptions.HTTPError,
        app.async_batch_scrape_urls,
        ["http://localhost:3000/not-a-tld"],
        formats=["markdown"],
        idempotency_key=key,
    )
    assert e.response.status_code == 400, f"invalid body: {e.response.status_code} {e}"
    e = expect_raise(
        requests.exceptions.HTTPError,
        app.async_batch_scrape_urls,
        urls("spent.example.com", 2),
        formats=["markdown"],
        idempotency_key=key,
    )
    assert e.response.status_code == 409, f"reuse after 400: {e.response.status_code} {e}"
    assert not [x for x in ledger() if x.get("name") == key], "a refused request was billed"


def check_firecrawl_v1_wrong_key_401():
    app = V1FirecrawlApp(api_key="fc-not-a-key", api_url=URL)
    e = expect_raise(requests.exceptions.HTTPError, app.async_batch_scrape_urls, urls("auth1.example.com", 2))
    assert e.response.status_code == 401, f"{e.response.status_code} {e}"


# --- Bright Data (brightdata-sdk, Web Scraper API v3) -----------------------

def check_brightdata_v3_trigger_progress_snapshot():
    want = urls("bd.example.com", 5)

    async def run():
        async with scraper_for("gd_sdkcheck001") as s:
            # The whole workflow: trigger -> /progress until ready -> /snapshot.
            results = await s.scrape_async(want, poll_interval=0.2, poll_timeout=30)
            assert isinstance(results, list) and len(results) == 5, f"results {results!r}"
            for url, r in zip(want, results):
                assert r.success, f"{url}: {r.error}"
                assert r.data["url"] == url and r.data["input"] == {"url": url}, f"{url}: {r.data}"
            sid = results[0].snapshot_id
            assert sid and sid.startswith("sd_"), f"snapshot id {sid!r}"

            # Step by step: trigger, status, wait, fetch.
            job = await s._trigger_scrape_async(want[:2], sdk_function="sdkcheck")
            first = await job.status()
            assert first in ("starting", "collecting", "ready"), f"first /progress status {first!r}"
            assert await job.wait(timeout=30, poll_interval=0.2) == "ready"
            rows = await job.fetch()
            assert [r["url"] for r in rows] == want[:2], f"rows {rows!r}"

            # The wrapped body ({"input": [...], "limit_per_input": N}) the
            # API client sends when a cap is asked for.
            sid3 = await s.api_client.trigger(
                [{"url": u} for u in want[:3]], "gd_sdkcheck001", limit_per_input=1
            )
            assert sid3 and sid3.startswith("sd_"), f"wrapped-body trigger answered {sid3!r}"
            return sid, job.snapshot_id, sid3

    sid, sid2, sid3 = asyncio.run(run())
    billed = {x["remote_id"]: x for x in ledger() if x["provider"] == "web_scraper"}
    assert billed[sid3]["inputs"] == 3, f"wrapped body: {billed[sid3]}"
    for snapshot in (sid, sid2):
        params = billed[snapshot]["params"]
        assert params.get("dataset_id") == "gd_sdkcheck001", f"params {params}"
        assert params.get("include_errors") == "true", f"params {params}"
    assert billed[sid2]["params"].get("sdk_function") == "sdkcheck", billed[sid2]["params"]
    progress = bd_raw(f"/datasets/v3/progress/{sid}").json()
    assert progress["status"] == "ready" and progress["records"] == 5, f"/progress {progress}"


def check_brightdata_v3_snapshot_build_lag_202():
    """Ready on /progress, then 202 from /snapshot twice: the SDK's
    DataNotReadyError path polls again."""
    before = requests_to("v3_snapshot")

    async def run():
        async with scraper_for("gd_sdklag00001") as s:
            return await s.scrape_async(urls("lag.example.com", 1)[0], poll_interval=0.2, poll_timeout=30)

    r = asyncio.run(run())
    assert r.success, f"error {r.error}"
    assert r.data["url"] == urls("lag.example.com", 1)[0], f"data {r.data}"
    downloads = requests_to("v3_snapshot") - before
    assert downloads == 3, f"{downloads} /snapshot requests (two 202s, then the data)"


def check_brightdata_v3_wrong_token_401():
    async def run():
        async with scraper_for("gd_sdkcheck001", token="not-the-demo-token") as s:
            # The SDK's engine turns any 401 into AuthenticationError
            # ("Unauthorized (401): <body>"), before the API client sees it.
            return await expect_raise_async(
                AuthenticationError, s._trigger_scrape_async(urls("bdauth.example.com", 1))
            )

    e = asyncio.run(run())
    assert "(401)" in str(e) and "Invalid credentials" in str(e), f"message {e}"


def check_weakness_brightdata_early_404_fails_job():
    """brightdata-sdk reads any non-200 /progress as status "error", so the
    documented 404 of a brand-new snapshot fails the whole job."""
    url = urls("early404.example.com", 1)[0]

    async def run():
        async with scraper_for("gd_sdkearly404") as s:
            return await s.scrape_async(url, poll_interval=0.2, poll_timeout=30)

    r = asyncio.run(run())
    assert not r.success and r.status == "error" and "status: error" in (r.error or ""), (
        f"weakness gone? the SDK now gets past the early 404: success={r.success}, "
        f"status={r.status!r}, error={r.error!r}"
    )
    # The snapshot itself was fine: it becomes ready and has the record.
    sid = r.snapshot_id

    def progress():
        p = bd_raw(f"/datasets/v3/progress/{sid}")
        return p.json() if p.ok and p.json().get("status") == "ready" else None

    ready = wait_until(progress, timeout=15, what="the early-404 snapshot to be ready")
    assert ready["records"] == 1, f"/progress {ready}"


def check_weakness_brightdata_failed_snapshot_drops_error_message():
    """brightdata-sdk keeps only the status word of a failed snapshot; the
    provider's error_message is lost."""

    async def run():
        async with scraper_for("gd_sdkfailed01") as s:
            return await s.scrape_async(urls("failed.example.com", 1)[0], poll_interval=0.2, poll_timeout=30)

    r = asyncio.run(run())
    assert not r.success and "failed" in (r.error or ""), f"success={r.success}, error={r.error!r}"
    progress = bd_raw(f"/datasets/v3/progress/{r.snapshot_id}").json()
    assert progress.get("status") == "failed" and progress.get("error_message") == FAIL_MESSAGE, progress
    assert FAIL_MESSAGE not in (r.error or "") and FAIL_MESSAGE not in str(r.to_dict()), (
        f"weakness gone? the SDK now reports the error_message: {r.error!r}"
    )


def check_weakness_brightdata_multi_url_results_paired_by_position():
    """scrape_async with several URLs pairs the snapshot's records with the
    URLs by position (zip), so with more than one record per input a URL is
    given another input's record and later records are dropped."""
    want = urls("multirow.example.com", 2)

    async def run():
        async with scraper_for("gd_sdkmultirow") as s:
            return await s.scrape_async(want, poll_interval=0.2, poll_timeout=30)

    results = asyncio.run(run())
    assert isinstance(results, list) and all(r.success for r in results), f"results {results!r}"
    records = bd_raw(f"/datasets/v3/snapshot/{results[0].snapshot_id}", params={"format": "json"}).json()
    assert len(records) == 4, f"the snapshot has {len(records)} records, not 2 per input"
    paired = [(r.url, r.data["url"]) for r in results]
    assert len(results) == 2 and paired[1] == (want[1], want[0]), (
        f"weakness gone? results pair URL -> record as {paired} (was: the second URL given "
        "the first URL's second record, 2 of 4 records returned)"
    )


# --- Bright Data (brightdata-sdk, Scraper Studio) ---------------------------

def studio_status_matches(collector, inputs):
    job_id = studio_trigger(collector, inputs)

    def fields(raw):
        low = {k.lower(): v for k, v in raw.items()}
        return {
            "id": low["id"],
            "status": low["status"],
            "collector": low["collector"],
            "inputs": low["inputs"],
            "lines": low["lines"],
            "fails": low["fails"],
            "success_rate": low["success_rate"],
            "created": low["created"],
            "started": low["started"],
            "finished": low["finished"],
            "job_time": low["job_time"],
            "queue_time": low["queue_time"],
        }

    async def read(client):
        # The job moves on its own clock: compare only a read the raw
        # answers on both sides agree with.
        while True:
            before = bd_raw(f"/dca/log/{job_id}").json()
            parsed = await client.scraper_studio.status(job_id)
            after = bd_raw(f"/dca/log/{job_id}").json()
            if before == after:
                return parsed, after

    async def run():
        async with BrightDataClient(token=BD_TOKEN, auto_create_zones=False) as client:
            seen = []
            while True:
                parsed, raw = await read(client)
                want = fields(raw)
                for name, value in want.items():
                    got = getattr(parsed, name)
                    # The SDK defaults missing counts to 0: compare like that.
                    if value in (None, 0, 0.0) and got in (None, 0, 0.0):
                        continue
                    assert got == value, f"{parsed.status}: {name} parsed {got!r}, /dca/log has {value!r}"
                seen.append(parsed.status)
                if parsed.status in ("done", "failed"):
                    return seen, parsed
                assert len(seen) < 100, f"statuses {seen[-5:]}"
                await asyncio.sleep(0.15)

    seen, final = asyncio.run(run())
    assert final.status == "done", f"statuses {seen}"
    assert final.id == job_id and final.collector == collector, final
    assert final.inputs == len(inputs), final
    return seen, final


def check_brightdata_scraper_studio_status_title_keys():
    inputs = [{"url": u} for u in urls("studio.example.com", 2)]
    seen, final = studio_status_matches("c_sdkstudiotitle", inputs)
    assert final.lines == 2 and final.fails == 0 and final.success_rate == 1.0, final


def check_brightdata_scraper_studio_status_lower_keys():
    inputs = [{"url": u} for u in urls("studio-lower.example.com", 3)]
    seen, final = studio_status_matches("c_sdkstudiolower", inputs)
    # rows_per_input = 2, error_every = 3: two inputs give 4 lines, one fails.
    assert final.lines == 4 and final.fails == 1, final
    assert abs(final.success_rate - 2 / 3) < 1e-9, final


CHECKS = [
    # First: the scenario's fault is the run's second Firecrawl status read.
    check_weakness_firecrawl_v2_partial_completed_on_429,
    check_firecrawl_v2_batch_scrape_250_paged,
    check_firecrawl_v2_start_status_errors_cancel,
    check_firecrawl_v2_invalid_urls,
    check_firecrawl_v2_wrong_key_401,
    check_firecrawl_v2_async_batch_scrape,
    check_firecrawl_v2_manual_paging,
    check_firecrawl_v2_sdk_scrape_options_accepted,
    check_firecrawl_v1_batch_scrape_urls,
    check_firecrawl_v1_status_and_errors,
    check_firecrawl_v1_idempotency_key_reused_409,
    check_firecrawl_v1_idempotency_key_spent_by_400,
    check_firecrawl_v1_wrong_key_401,
    check_brightdata_v3_trigger_progress_snapshot,
    check_brightdata_v3_snapshot_build_lag_202,
    check_brightdata_v3_wrong_token_401,
    check_weakness_brightdata_early_404_fails_job,
    check_weakness_brightdata_failed_snapshot_drops_error_message,
    check_weakness_brightdata_multi_url_results_paired_by_position,
    check_brightdata_scraper_studio_status_title_keys,
    check_brightdata_scraper_studio_status_lower_keys,
]


def main(argv):
    global URL
    if len(argv) < 2 or not argv[1].startswith("http://"):
        print(f"usage: {argv[0]} http://127.0.0.1:PORT [CHECK ...]", file=sys.stderr)
        return 2
    URL = argv[1].rstrip("/")
    only = set(argv[2:])
    names = {f.__name__[len("check_"):] for f in CHECKS}
    unknown = only - names
    if unknown:
        print(f"unknown checks: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2

    versions = {"firecrawl-py": firecrawl.__version__, "brightdata-sdk": brightdata.__version__}
    pinned = {"firecrawl-py": FIRECRAWL_VERSION, "brightdata-sdk": BRIGHTDATA_VERSION}
    if versions != pinned:
        print(f"FAIL sdk_versions: installed {versions}, suite written for {pinned}")
        return 1
    point_brightdata_at(URL)

    failed = 0
    for check in CHECKS:
        name = check.__name__[len("check_"):]
        if only and name not in only:
            continue
        started = time.monotonic()
        try:
            check()
        except Exception as e:  # noqa: BLE001  (a check fails on anything)
            failed += 1
            why = str(e) or type(e).__name__
            if not isinstance(e, AssertionError):
                why = f"{type(e).__name__}: {why}"
            print(f"FAIL {name}: {' '.join(why.split())}", flush=True)
            if os.environ.get("SDK_CHECK_TRACEBACK"):
                traceback.print_exc()
        else:
            print(f"ok {name}", flush=True)
        if os.environ.get("SDK_CHECK_TIMES"):
            print(f"  {name}: {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
