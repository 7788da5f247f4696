"""The comfyui connector against the protocol-faithful fake (tests/fakes/comfyui.py), over real loopback HTTP."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
import time

import aiohttp
import pytest
from _helpers import connector_context, TRACEPARENT, Progress, job, wait_for
from fakes.comfyui import FakeComfyUI
from fakes.comfyui_nodes import full_type_name

from emp_machine.connectors._comfyui_events import ProgressTracker, execution_error
from emp_machine.connectors._http import STOP_GRACE_S as STOP_PROMPT_GRACE_S
from emp_machine.connectors.comfyui import ComfyUIConnector
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, can_retry


def happy(color=None, **overrides):
    """The captured two-output workflow (§2); a random colour defeats the server's cache between tests."""
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": random.randrange(1 << 24) if color is None else color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                     "width": 128, "height": 96, "crop": "disabled"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "capture/happy"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    for key, value in overrides.items():
        node, name = key.split("__")
        graph[node]["inputs"][name] = value
    return graph


def sleeper(seconds):
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                         "color": random.randrange(1 << 24)}},
            "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "sleep"}}}


def slow_chain():
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 2048, "height": 2048, "batch_size": 1,
                                                          "color": random.randrange(1 << 24)}}}
    for node, source in (("10", "1"), ("11", "10"), ("12", "11")):
        graph[node] = {"class_type": "ImageBlur", "inputs": {"image": [source, 0], "blur_radius": 15, "sigma": 3.0}}
    graph["99"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "slow"}}
    return graph


@pytest.fixture
def fake(serve):
    return lambda **knobs: serve(FakeComfyUI, **knobs)


@pytest.fixture
def context(tmp_path):
    return connector_context(tmp_path, "comfyui")


def connector(context, server, **settings):
    return ComfyUIConnector.from_settings({"base_url": server.url if server else "http://127.0.0.1:9",
                                           **settings}, context)


def run(conn, payload, progress=None, job_id="job-1"):
    progress = progress or Progress()

    async def main():
        try:
            return await conn.run(job(payload, job_id), progress)
        finally:
            await conn.close()
    return asyncio.run(main()), progress


def test_success_downloads_outputs_and_reports_progress(fake, context, caplog):
    server = fake()
    caplog.set_level(logging.INFO, "test.comfyui")
    result, progress = run(connector(context, server), {"workflow": happy()})
    by_name = {o.path.rsplit("/", 1)[-1]: o for o in result.outputs}
    assert sorted(by_name) == ["4_happy_00001_.png", f"5_ComfyUI_temp_{server.proc.temp_suffix}_00001_.png"]
    for output in result.outputs:
        data = open(output.path, "rb").read()
        assert data.startswith(b"\x89PNG") and len(data) == output.size_bytes and output.mime_type == "image/png"
        assert output.path.startswith(str(context.output_dir / "job-1"))
    assert server.files[("output", "capture", "happy_00001_.png")] == open(by_name["4_happy_00001_.png"].path, "rb").read()
    # 0 when queued, one report per node, 100 only with the result in hand, never backwards
    assert progress.percents[0] == 0 and progress.percents[-1] == 100
    assert progress.percents == sorted(progress.percents) and max(progress.percents[:-1]) < 100
    assert [m for _, m in progress.seen[1:-1]] == ["node 1 (EmptyImage)", "node 2 (ImageInvert)",
                                                    "node 5 (PreviewImage)", "node 3 (ImageScale)",
                                                    "node 4 (SaveImage)"]
    meta = result.service_metadata
    assert result.data == {"prompt_id": meta["prompt_id"], "node_outputs": {}} and meta["cached_nodes"] == []
    # our own prompt_id and client_id, the same client id on the socket and in the POST, trace headers
    [post] = [r for r in server.requests if r[:2] == ("POST", "/prompt")]
    [ws] = [r for r in server.requests if r[1].startswith("/ws?")]
    assert ws[1] == f"/ws?clientId={meta['client_id']}"
    assert post[2]["traceparent"] == TRACEPARENT and post[2]["x-job-id"] == "job-1"
    assert post[2]["x-request-id"].startswith("req-")
    assert server.requests.index(ws) < server.requests.index(post)  # the socket first (§7.1)
    ours = [r for r in caplog.records if r.name == "test.comfyui"]
    events = [r.event_type for r in ours]
    assert events[0] == "job.received" and "job.started" in events and events[-1] == "job.completed"
    assert all(r.fields["prompt_id"] == meta["prompt_id"] and r.fields["client_id"] == meta["client_id"]
               for r in ours)


def test_bare_graph_and_text_outputs(fake, context):
    server = fake()
    graph = {"1": {"class_type": "PrimitiveString", "inputs": {"value": f"hello {random.random()}"}},
             "2": {"class_type": "RegexReplace", "inputs": {"string": ["1", 0], "regex_pattern": "l+", "replace": "L"}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    result, _ = run(connector(context, server), graph)
    assert result.outputs == [] and result.data["node_outputs"]["3"]["text"][0].startswith("heLo ")


def test_float_progress_is_throttled_monotonic_and_fractional(fake, context):
    server = fake(preview_frames=True)  # binary preview frames interleaved: skipped, not fatal
    result, progress = run(connector(context, server), sleeper(0.3))
    inside = [p for p, m in progress.seen if m == "node 2 (TestSleep)"]
    # node 2 is the second of three nodes: its float value/max moves percent through (33.3, 66.7)
    assert len(inside) >= 5 and all(33.3 <= p < 66.7 for p in inside)
    assert any(p != int(p) for p in inside)
    assert len(inside) < 31  # ~30 ticks at 10 ms, reported only per whole percent moved
    assert progress.percents == sorted(progress.percents) and progress.percents[-1] == 100
    assert len(result.outputs) == 1


def test_cached_rerun_still_returns_the_files(fake, context):
    server = fake()
    graph = happy(color=123)
    first, _ = run(connector(context, server), graph, job_id="a")
    second, progress = run(connector(context, server), graph, job_id="b")
    assert second.service_metadata["cached_nodes"] == ["1", "2", "3", "4", "5"]
    assert [o.size_bytes for o in second.outputs] == [o.size_bytes for o in first.outputs]
    assert [o.path.rsplit("/", 1)[1] for o in second.outputs] == [o.path.rsplit("/", 1)[1] for o in first.outputs]
    assert progress.percents[-1] == 100 and all(not m.startswith("node ") for _, m in progress.seen)


def test_history_lagging_behind_the_terminal_frame_is_polled(fake, context):
    server = fake(history_hidden_gets=3)
    result, _ = run(connector(context, server), happy())
    assert len(result.outputs) == 2
    gets = [r for r in server.requests if r[1].startswith("/history/")]
    assert len(gets) == 4


def test_history_that_never_appears_is_a_retryable_failure(fake, context):
    server = fake(history_hidden_gets=10**6)
    with pytest.raises(RetryableJobError, match="/history had no entry within 0.3 s"):
        run(connector(context, server, history_wait_s=0.3), happy())


@pytest.mark.parametrize("graph,fragments", [
    (happy(**{"1__width": 100000}), ["prompt_outputs_failed_validation",
                                     "node 1 (EmptyImage): value_bigger_than_max: Value 100000 bigger than max"]),
    ({**happy(), "2": {"class_type": "NoSuchNode", "inputs": {}}}, ["invalid_prompt", "NoSuchNode does not exist"]),
    (happy(**{"2__image": ["42", 0]}), ["node 2 (ImageInvert): exception_during_inner_validation"]),
])
def test_rejected_workflow_is_permanent_with_node_errors(fake, context, graph, fragments):
    server = fake()
    with pytest.raises(FatalJobError) as caught:
        run(connector(context, server), graph)
    assert all(f in str(caught.value) for f in fragments), str(caught.value)
    assert "rejected the workflow" in str(caught.value) and not can_retry(caught.value)


def test_200_with_node_errors_is_permanent_and_the_partial_run_is_stopped(fake, context):
    server = fake()
    with pytest.raises(FatalJobError) as caught:
        run(connector(context, server), happy(**{"3__upscale_method": "super-resolution"}))
    text = str(caught.value)
    assert "accepted only part" in text and "node 3 (ImageScale): value_not_in_list" in text
    assert "super-resolution" in text
    assert ("POST", "/queue") in [r[:2] for r in server.requests] and server.interrupt_calls
    assert list(context.output_dir.glob("**/*.png")) == []


# what ComfyUI names a bad regex's exception: re.error, re.PatternError from Python 3.13 on (an alias kept)
RE_ERROR = full_type_name(re.error("x"))


@pytest.mark.parametrize("node,error,fragment", [
    ({"class_type": "RegexReplace", "inputs": {"string": ["1", 0], "regex_pattern": "(", "replace": "x"}},
     FatalJobError, f"node 2 (RegexReplace) raised {RE_ERROR}: missing ), unterminated subpattern at position 0"),
    ({"class_type": "TestSyncError", "inputs": {"value": ["1", 0]}},
     FatalJobError, "node 2 (TestSyncError) raised RuntimeError: Intentional sync execution error"),
    ({"class_type": "CustomOOM", "inputs": {"value": ["1", 0]}},
     RetryableJobError, "node 2 (CustomOOM) raised torch.OutOfMemoryError: CUDA out of memory"),
])
def test_execution_error_names_node_and_exception(fake, context, node, error, fragment):
    server = fake()
    graph = {"1": {"class_type": "PrimitiveString", "inputs": {"value": f"hello {random.random()}"}}, "2": node,
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    with pytest.raises(error) as caught:
        run(connector(context, server), graph)
    assert type(caught.value) is error and fragment in str(caught.value)
    assert "current_inputs" not in str(caught.value)


def test_execution_error_classification_rules():
    def classify(exc_type, message="boom"):
        return type(execution_error({"node_id": "7", "node_type": "X", "exception_type": exc_type,
                                     "exception_message": message + "\n"}))
    assert classify("torch.cuda.OutOfMemoryError") is RetryableJobError
    assert classify("RuntimeError", "CUDA error: out of memory") is RetryableJobError
    assert classify("requests.exceptions.ConnectionError") is RetryableJobError
    assert classify("ValueError") is FatalJobError and classify("FileNotFoundError") is FatalJobError


@pytest.mark.parametrize("payload,fragment", [
    ({"nodes": [], "links": []}, "UI format"), ([1, 2], "payload must be"), ({}, "payload must be"),
    ({"workflow": {"1": {"inputs": {}}}}, "is not an object with a class_type"),
])
def test_bad_payload_fails_before_any_request(context, payload, fragment):
    with pytest.raises(FatalJobError, match=fragment):
        run(connector(context, None), payload)


def test_cancel_running_prompt_interrupts_it(fake, context):
    server = fake()
    conn = connector(context, server)
    progress = Progress()
    progress.when(lambda p, m: m == "node 2 (TestSleep)", lambda: conn.cancel("job-1"))
    started = time.monotonic()
    with pytest.raises(JobCancelled, match="interrupted prompt .* at node 2 \\(TestSleep\\)"):
        run(conn, sleeper(30), progress)
    assert time.monotonic() - started < 5
    assert server.interrupt_calls[-1]["prompt_id"]


def test_cancel_pending_prompt_deletes_it_from_the_queue(fake, context):
    server = fake()
    conn = connector(context, server)

    async def main():
        async with aiohttp.ClientSession() as http:  # another client keeps the server busy
            async with http.post(server.url + "/prompt", json={"prompt": sleeper(30)}) as response:
                blocker = (await response.json())["prompt_id"]
            progress = Progress()
            progress.when(lambda p, m: m.startswith("queued"), lambda: conn.cancel("job-1"))
            with pytest.raises(JobCancelled):
                await conn.run(job(sleeper(0.1)), progress)
            async with http.get(server.url + "/queue") as response:
                queue = await response.json()
            assert [i[1] for i in queue["queue_running"]] == [blocker] and queue["queue_pending"] == []
            assert progress.percents == [0]
            await http.post(server.url + "/interrupt")
        await conn.close()
    asyncio.run(main())


def test_an_output_download_cut_short_leaves_no_partial_file(serve, context):
    # The retry fetches it again under another name (`-1`): the half file stayed in the job's folder for good.
    server = serve(FakeComfyUI)
    server.temp_view_cut = True
    with pytest.raises(RetryableJobError):
        run(connector(context, server), happy())
    folder = context.output_dir / "job-1"
    assert [p.name for p in folder.iterdir()] == ["4_happy_00001_.png"]  # the saved image, fetched whole
    assert (folder / "4_happy_00001_.png").read_bytes() == next(
        data for (kind, _, name), data in server.files.items() if kind == "output")


def test_job_timeout_is_retryable_and_stops_the_prompt(fake, context):
    server = fake()
    with pytest.raises(RetryableJobError, match="did not finish within 0.5 s"):
        run(connector(context, server, job_timeout_s=0.5), sleeper(30))
    assert server.interrupt_calls


def test_cancelled_run_with_a_hung_server_ends_at_once_and_its_stop_is_bounded(fake, context, caplog):
    # The worker cancels run() on its job timeout and on a drain: the stop requests (request_timeout_s each)
    # used to hold the cancellation, so a hung server overran the timeout / outlasted the drain's hand-back.
    server = fake()
    caplog.set_level(logging.INFO, "test.comfyui")
    conn = connector(context, server, request_timeout_s=10)

    async def main():
        hung = asyncio.Event()

        async def freeze():
            server.freeze()
            hung.set()
        progress = Progress()
        progress.when(lambda p, m: m == "node 2 (TestSleep)", freeze)
        task = asyncio.create_task(conn.run(job(sleeper(30)), progress))
        await asyncio.wait_for(hung.wait(), 10)
        mark = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_in = time.monotonic() - mark
        await wait_for(lambda: not conn._stopping, STOP_PROMPT_GRACE_S + 2)  # the stop gives up on its own
        stopped_in = time.monotonic() - mark
        await conn.close()
        return cancelled_in, stopped_in
    cancelled_in, stopped_in = asyncio.run(main())
    assert cancelled_in < 1.0, cancelled_in
    assert stopped_in < STOP_PROMPT_GRACE_S + 1, stopped_in
    [failed] = [r for r in caplog.records if getattr(r, "event_type", None) == "cancel_failed"]
    assert f"did not answer the stop within {STOP_PROMPT_GRACE_S:g} s" in failed.fields["error"]


def test_job_timeout_with_a_hung_server_is_not_held_by_the_stop(fake, context):
    server = fake()
    conn = connector(context, server, job_timeout_s=0.5, request_timeout_s=10)
    progress = Progress()

    async def freeze():
        server.freeze()
    progress.when(lambda p, m: m == "node 2 (TestSleep)", freeze)
    started = time.monotonic()
    with pytest.raises(RetryableJobError, match="did not finish within 0.5 s"):
        run(conn, sleeper(30), progress)
    assert time.monotonic() - started < 0.5 + STOP_PROMPT_GRACE_S + 1.5


def test_server_killed_mid_job_and_restarted_empty_is_retryable(fake, context):
    server = fake(blur_s=0.5)
    conn = connector(context, server)
    progress = Progress()

    async def kill_and_restart():
        await server.kill()
        await server.restart()
    progress.when(lambda p, m: m == "node 10 (ImageBlur)", kill_and_restart)
    with pytest.raises(RetryableJobError, match="restarted during prompt .* in neither /history nor /queue"):
        run(conn, slow_chain(), progress)
    assert server.proc.history == {}


def test_server_killed_and_not_back_in_time_is_retryable(fake, context):
    server = fake(blur_s=0.5)
    conn = connector(context, server, reconnect_timeout_s=0.5)
    progress = Progress()
    progress.when(lambda p, m: m == "node 10 (ImageBlur)", server.kill)
    with pytest.raises(RetryableJobError, match="not back within 0.5 s"):
        run(conn, slow_chain(), progress)


def test_dropped_socket_reconnects_and_the_job_still_completes(fake, context):
    server = fake(blur_s=0.3)
    progress = Progress()
    progress.when(lambda p, m: m == "node 10 (ImageBlur)", server.drop_sockets)
    result, _ = run(connector(context, server), slow_chain(), progress)
    assert len(result.outputs) == 1 and progress.percents[-1] == 100
    assert len([r for r in server.requests if r[1].startswith("/ws?")]) == 2
    client_ids = {r[1] for r in server.requests if r[1].startswith("/ws?")}
    assert len(client_ids) == 1  # the same client id, so the prompt's events come to the new socket


def test_connection_refused_is_retryable_and_health_says_why(fake, context):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        conn = ComfyUIConnector.from_settings({"base_url": f"http://127.0.0.1:{port}"}, context)
        with pytest.raises(RetryableJobError, match="ComfyUI unreachable"):
            run(conn, happy())
        health = asyncio.run(conn.health())
    assert not health.healthy and "unreachable" in health.reason
    server = fake()
    up = connector(context, server)

    async def check():
        try:
            return await up.health()
        finally:
            await up.close()
    assert asyncio.run(check()).healthy


def test_progress_tracker_counts_cached_nodes_and_never_goes_back():
    tracker = ProgressTracker({str(i): {"class_type": "X"} for i in range(1, 5)})
    tracker.cached(["1", "2"])
    assert tracker.percent() == 50
    tracker.executing("3")
    tracker.tick("3", 0.15, 0.3)
    assert tracker.percent() == 62.5
    tracker.tick("3", "bad", None)  # ignored, not a crash
    assert tracker.report()[0] == 62.5 and tracker.report()[0] is None


@pytest.mark.parametrize("removal", ["delete", "clear"])
def test_our_pending_prompt_removed_by_someone_else_fails_retryable_at_once(fake, context, removal):
    # POST /queue {"delete"|"clear"} by another client (the UI's "Clear queue"): no frame names our prompt,
    # only a status frame with a lower queue_remaining, and /history stays {} (§6.3). It used to wait for
    # job_timeout_s (1 h by default).
    server = fake()
    conn = connector(context, server, job_timeout_s=30)

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/prompt", json={"prompt": sleeper(30)}) as response:
                blocker = (await response.json())["prompt_id"]
            queued = asyncio.Event()

            async def on_queued():
                queued.set()
            progress = Progress()
            progress.when(lambda p, m: m.startswith("queued"), on_queued)
            task = asyncio.create_task(conn.run(job(sleeper(0.1)), progress))
            await asyncio.wait_for(queued.wait(), 10)
            ours = conn._active["job-1"].prompt_id
            body = {"delete": [ours]} if removal == "delete" else {"clear": True}
            mark = time.monotonic()
            await http.post(server.url + "/queue", json=body)
            with pytest.raises(RetryableJobError, match=f"prompt {ours} was removed from ComfyUI's queue"):
                await asyncio.wait_for(task, 10)
            assert time.monotonic() - mark < 3
            async with http.get(server.url + "/queue") as response:
                assert [i[1] for i in (await response.json())["queue_running"]] == [blocker]
            await http.post(server.url + "/interrupt")
        await conn.close()
    asyncio.run(main())


def test_a_prompt_ahead_of_ours_finishing_is_not_taken_for_a_removal(fake, context):
    # The queue shrinking because the prompt before ours finished looks the same in the status frame: the
    # one /queue read finds ours (now running) and the job completes.
    server = fake()
    conn = connector(context, server)

    async def main():
        async with aiohttp.ClientSession() as http:
            await http.post(server.url + "/prompt", json={"prompt": sleeper(0.3)})
            result = await conn.run(job(happy()), Progress())
        await conn.close()
        return result
    result = asyncio.run(main())
    assert len(result.outputs) == 2
    assert ("GET", "/queue") in [r[:2] for r in server.requests]  # the check ran, and found it


def test_an_unreadable_queue_answer_is_not_taken_for_a_removal(fake, context):
    # A proxy's 502 for the one /queue read after the queue shrank said nothing about our prompt: it used to
    # fail the job ("removed from ComfyUI's queue") while ComfyUI still ran it, for nobody.
    server = fake()
    server.queue_read_failures = 1
    conn = connector(context, server)

    async def main():
        async with aiohttp.ClientSession() as http:
            await http.post(server.url + "/prompt", json={"prompt": sleeper(0.3)})
            result = await conn.run(job(sleeper(0.5)), Progress())  # still pending when the check runs
        await conn.close()
        return result
    asyncio.run(main())  # completed: not failed as "removed"
    assert server.queue_read_failures == 0  # the 502 was given
    assert [r[:2] for r in server.requests].count(("GET", "/queue")) == 1


@pytest.mark.parametrize("how", ["request_timeout", "cancelled"])
def test_a_prompt_posted_without_an_answer_is_stopped(fake, context, how):
    # ComfyUI queued the prompt but its answer never came (request_timeout_s), or the worker cancelled run()
    # while POST /prompt was in flight (job timeout, drain): the prompt used to run for nobody. We chose its
    # id, so it is stopped (queue delete + targeted interrupt) in the background.
    server = fake(blur_s=0.5, prompt_answer_delay_s=3)
    conn = connector(context, server, request_timeout_s=0.5)

    async def main():
        task = asyncio.create_task(conn.run(job(slow_chain()), Progress()))
        await wait_for(lambda: server.proc.running is not None or server.proc.queue, 5)
        prompt_id = conn._active["job-1"].prompt_id
        if how == "request_timeout":
            with pytest.raises(RetryableJobError, match="ComfyUI timed out at .*/prompt"):
                await task
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_for(lambda: prompt_id in server.proc.history, STOP_PROMPT_GRACE_S + 5)
        await conn.close()
        return prompt_id
    prompt_id = asyncio.run(main())
    assert {"prompt_id": prompt_id} in server.interrupt_calls
    assert ("POST", "/queue") in [r[:2] for r in server.requests]
    messages = server.proc.history[prompt_id]["status"]["messages"]
    assert messages[-1][0] == "execution_interrupted" and server.proc.history[prompt_id]["outputs"] == {}


# -- rules mutation audit M6 found unpinned ----------------------------------------------------------------

class _AnsweringPrompt(FakeComfyUI):
    """POST /prompt answers `status` as it comes: a proxy in front of ComfyUI (502/503/504 while it restarts),
    or ComfyUI's own 500 when the graph's validation raised (the same graph raises again on every retry)."""

    def __init__(self, status: int, **knobs):
        super().__init__(**knobs)
        self.status = status

    async def post_prompt(self, request):
        from aiohttp import web

        await request.read()
        if self.status == 500:
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        return web.Response(status=self.status, text=f"{self.status} from the proxy")


@pytest.mark.parametrize("status, retryable", [(502, True), (503, True), (504, True), (500, False)])
def test_post_prompt_answers_are_classified_as_the_service_means_them(serve, context, status, retryable):
    server = serve(_AnsweringPrompt, status)
    with pytest.raises(RetryableJobError if retryable else FatalJobError) as info:
        run(connector(context, server), happy())
    assert can_retry(info.value) is retryable and str(status) in str(info.value)


def test_an_error_only_the_history_records_is_a_failure_naming_the_node(context):
    # Its execution_error frame missed (the socket dropped meanwhile, §6.2), the history entry is all the
    # connector has: it must fail the job, with the node and the exception, never complete it without outputs.
    from emp_machine.connectors.comfyui import _Active

    conn = connector(context, None)
    active = _Active(job(happy()), "pid-1", "emp-x")
    error = {"prompt_id": "pid-1", "node_id": "4", "node_type": "SaveImage", "exception_type": "ValueError",
             "exception_message": "bad value", "traceback": [], "current_inputs": {}, "current_outputs": {}}
    entry = {"status": {"status_str": "error", "completed": False,
                        "messages": [["execution_start", {"prompt_id": "pid-1"}], ["execution_error", error]]},
             "outputs": {}}
    with pytest.raises(FatalJobError, match=r"node 4 \(SaveImage\) raised ValueError: bad value"):
        asyncio.run(conn._finish(active, ProgressTracker(happy()), entry, Progress()))
    bare = {"status": {"status_str": "error", "completed": False, "messages": []}, "outputs": {}}
    with pytest.raises(FatalJobError):
        asyncio.run(conn._finish(active, ProgressTracker(happy()), bare, Progress()))


class _DeafToInterrupts(FakeComfyUI):
    """/interrupt answers 200 and stops nothing (a custom node that never checks for it)."""

    async def interrupt(self, request):
        from aiohttp import web

        self.interrupt_calls.append(await request.text())
        return web.Response(status=200)


def test_a_cancel_the_server_never_confirms_ends_after_cancel_wait(serve, context):
    server = serve(_DeafToInterrupts)
    conn = connector(context, server, cancel_wait_s=0.5)
    progress = Progress()
    progress.when(lambda p, m: m == "node 2 (TestSleep)", lambda: conn.cancel("job-1"))

    async def main():
        try:
            return await asyncio.wait_for(conn.run(job(sleeper(20)), progress), 15)
        finally:
            await conn.close()

    with pytest.raises(JobCancelled, match="not confirmed within 0.5 s"):  # not when the 20 s node ends
        asyncio.run(main())
    assert server.interrupt_calls


class _HistoryElsewhere(FakeComfyUI):
    """GET /history/{id} sends the client to a port nothing listens on: a connection that cannot be made once
    ComfyUI took the prompt (as when it died between its terminal frame and our read of the history)."""

    def __init__(self, closed_port: int, **knobs):
        super().__init__(**knobs)
        self.closed_port = closed_port

    async def get_history(self, request):
        from aiohttp import web

        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{self.closed_port}{request.path}")


def test_a_service_unreachable_after_it_took_the_prompt_is_a_counted_attempt(serve, context):
    # Unreachable before the prompt was sent, the job never reached ComfyUI (handed back, no attempt counted);
    # after it, a prompt that brings the server down must run out of retries: a retryable failure.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    server = serve(_HistoryElsewhere, closed_port)
    with pytest.raises(RetryableJobError) as info:
        run(connector(context, server), happy())
    assert type(info.value) is RetryableJobError and "unreachable" in str(info.value).lower(), info.value
