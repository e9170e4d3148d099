"""The app as an MCP server: the tools ``generate`` and ``variants`` (triplane_turbo/web/tools.py).

Live: the ``mcp`` SDK's own client (streamable HTTP) against ``python app.py --tiny`` (conftest's
``app_server``, MCP on by default) lists the tools and calls them; the GLB a call names is downloaded
from the app (loopback) and loaded. Without a server: the tools' admission (the page's validators
and queue bound), their answers from the store before queueing, and ``--no-mcp``.
"""

from __future__ import annotations

import asyncio
import io
import json
import typing
import urllib.error
import urllib.parse
import urllib.request
from types import SimpleNamespace

import pytest
import trimesh
from gradio.caching import CacheMissError, ProbeCache
from gradio.data_classes import _StaticFiles

import app as webapp
from triplane_turbo.web import ModelLoader
from triplane_turbo.web.settings import RESOLUTIONS
from triplane_turbo.web.tools import TOOL_GENERATE_PARAMETERS, Tools, offer_tools, one_line_per_argument

from .conftest import free_port
from .test_web import StubPipe, handlers_for, sphere_output

mcp = pytest.importorskip("mcp", reason="gradio[mcp] is not installed")


def mcp_session(url: str, act):
    """Runs ``await act(session)`` in an initialised MCP session with the app at ``url``; returns its result."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def main():
        async with streamablehttp_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await act(session)

    return asyncio.run(main())


def call_tool(url: str, name: str, arguments: dict):
    return mcp_session(url, lambda session: session.call_tool(name, arguments))


def fetch(url: str) -> bytes:
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


# ---------------------------------------------------------------------------------------------
# The live server
# ---------------------------------------------------------------------------------------------
def test_the_tools_are_generate_and_variants_with_their_arguments_described(app_server):
    tools = {tool.name: tool for tool in mcp_session(app_server.url, lambda s: s.list_tools()).tools}
    assert sorted(tools) == ["generate", "variants"]  # the page's own endpoints and helpers are not tools
    generate, variants = tools["generate"], tools["variants"]
    assert "3D mesh" in generate.description and "GLB" in generate.description
    assert "link" in generate.description and "glb_url" in generate.description  # what it returns
    schema = generate.inputSchema
    assert list(schema["properties"]) == TOOL_GENERATE_PARAMETERS and schema["required"] == ["prompt"]
    described = {name: p.get("description", "") for name, p in schema["properties"].items()}
    assert "One object" in described["prompt"] and "a frog wearing a sweater" in described["prompt"]
    assert "random seed" in described["seed"] and "same mesh" in described["seed"]
    assert schema["properties"]["mesh_resolution"]["enum"] == list(RESOLUTIONS)
    assert schema["properties"]["texture"]["enum"] == ["uv", "vertex"] and "baked" in described["texture"]
    assert all(described.values()), described
    assert list(variants.inputSchema["properties"]) == ["prompt", "seed", "count", "mesh_resolution"]
    assert "1 to 8" in variants.inputSchema["properties"]["count"]["description"]


@pytest.mark.timeout(120)
def test_generate_through_mcp_names_a_glb_that_loads(app_server):
    result = call_tool(app_server.url, "generate", {"prompt": "a wooden chair", "seed": 4242, "mesh_resolution": 128,
                                                    "texture": "uv"})
    assert not result.isError, result.content
    (text,) = result.content
    answer = json.loads(text.text)
    details = answer["details"]
    assert answer["seed"] == details["seed"] == 4242 and details["prompt"] == "a wooden chair"
    assert details["mesh_resolution"] == 128 and details["cached"] is False and details["device"] == "cpu"
    (geometry,) = trimesh.load_scene(io.BytesIO(fetch(answer["glb_url"])), file_type="glb",
                                     process=False).geometry.values()
    assert len(geometry.faces) == details["faces"] > 100
    assert geometry.visual.material.baseColorTexture.size == (app_server.texture_size,) * 2
    assert sorted(answer["downloads"]) == ["3mf", "glb", "obj_zip", "ply", "stl", "usdz"]
    assert answer["downloads"]["glb"] == answer["glb_url"]
    stl = trimesh.load(io.BytesIO(fetch(answer["downloads"]["stl"])), file_type="stl", process=False)
    assert len(stl.faces) == details["faces"]
    assert fetch(answer["preview_url"]).startswith(b"\x89PNG")
    link = urllib.parse.urlsplit(answer["link"])
    assert answer["link"].startswith(app_server.url)
    assert urllib.parse.parse_qs(link.query) == {"prompt": ["a wooden chair"], "seed": ["4242"], "resolution": ["128"]}
    # the same call again is a stored result; variants from that seed share it
    again = json.loads(call_tool(app_server.url, "generate", {"prompt": "a wooden chair", "seed": 4242,
                                                              "mesh_resolution": 128}).content[0].text)
    assert again["details"]["cached"] is True and again["glb_url"] == answer["glb_url"]
    variants = json.loads(call_tool(app_server.url, "variants", {"prompt": "a wooden chair", "seed": 4242, "count": 2,
                                                                 "mesh_resolution": 128}).content[0].text)
    assert [v["seed"] for v in variants["variants"]] == [4242, 4243] and variants["missing_seeds"] == []
    assert variants["variants"][0]["glb_url"] == answer["glb_url"]
    assert variants["variants"][1]["details"]["cached"] is False


def test_bad_arguments_are_answered_with_what_is_wrong(app_server):
    result = call_tool(app_server.url, "generate", {"prompt": "   ", "seed": 1})
    assert result.isError and "prompt" in result.content[0].text and "empty" in result.content[0].text
    result = call_tool(app_server.url, "variants", {"prompt": "a chair", "seed": 1, "count": 9})
    assert result.isError and "count must be between 1 and 8" in result.content[0].text


# ---------------------------------------------------------------------------------------------
# Without a server
# ---------------------------------------------------------------------------------------------
def test_the_tools_share_the_pages_queue_bound_and_store(tmp_path):
    """Admission as for the page: bad inputs and a full GPU queue are answered before queueing; a stored
    result is answered (probe: without queueing) whatever waits; a random seed is never stored."""
    handlers = handlers_for(tmp_path, StubPipe(sphere_output))
    handlers.admission.max_queue = 1
    tools = Tools(handlers)
    made = json.loads(tools.generate("a chair", 7, 128, "vertex"))
    assert made["seed"] == 7 and made["details"]["cached"] is False
    with ProbeCache():  # what Gradio asks before queueing
        stored = json.loads(tools.generate("a chair", 7, 128, "vertex"))
        with pytest.raises(CacheMissError):
            tools.generate("a chair", 8, 128, "vertex")
    assert stored["details"]["cached"] is True and stored["glb_url"] == made["glb_url"]
    verdicts = tools.validate_generate("a chair", "x", 128, "vertex")
    assert [v["is_valid"] for v in verdicts] == [True, False, True, True, True, True]
    assert all(v["is_valid"] for v in tools.validate_generate("a chair", 8, 128, "vertex"))  # one may wait ...
    for busy in (tools.validate_generate("a chair", None, 128, "vertex"), tools.validate_variants("a chair", 20)):
        assert not busy[0]["is_valid"] and "busy" in busy[0]["message"]  # ... not a second
    assert all(v["is_valid"] for v in tools.validate_generate("a chair", 7, 128, "vertex")), "stored: answered"
    assert not tools.validate_variants("a chair", None, 2)[0]["is_valid"], "random seeds are never stored"
    verdicts = tools.validate_variants("a chair", 1, 0)
    assert [v["is_valid"] for v in verdicts] == [True, True, False, True]


def test_the_tool_signatures_follow_the_settings():
    hints = typing.get_type_hints(Tools.generate)
    assert typing.get_args(hints["mesh_resolution"]) == RESOLUTIONS
    assert typing.get_args(typing.get_type_hints(Tools.variants)["mesh_resolution"]) == RESOLUTIONS

    @one_line_per_argument
    def tool(a: int):
        """Does a thing.

        Args:
            a: the first line
                and its continuation.
        Returns:
            Something
                long.
        """

    assert tool.__doc__.splitlines()[-3:] == ["    a: the first line and its continuation.", "Returns:",
                                              "    Something long."]


def test_on_a_space_the_tools_carry_its_name():
    """Gradio prefixes tools with the Space's name (``SPACE_ID``), made a valid tool name."""
    from gradio.mcp import GradioMCPServer

    server = SimpleNamespace(tool_prefix="triplane-turbo_", tool_to_endpoint={"generate": "/generate"},
                             valid_and_unique_tool_name=GradioMCPServer.valid_and_unique_tool_name)
    offer_tools(SimpleNamespace(mcp_server_obj=server))
    assert server.tool_to_endpoint == {"triplane_turbo_generate": "/mcp_generate",
                                       "triplane_turbo_variants": "/mcp_variants"}


def test_mcp_is_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv("TRIPLANE_TURBO_MCP", raising=False)
    assert webapp.parse_args([]).mcp and not webapp.parse_args(["--no-mcp"]).mcp
    for off in ("0", "false"):
        monkeypatch.setenv("TRIPLANE_TURBO_MCP", off)
        assert not webapp.parse_args([]).mcp
    monkeypatch.setenv("TRIPLANE_TURBO_MCP", "1")
    assert webapp.parse_args([]).mcp


@pytest.mark.parametrize("flags", [[], ["--no-mcp"]])
def test_no_mcp_leaves_the_mcp_route_absent(tmp_path, flags):
    """The page as ``app.py`` launches it with and without ``--no-mcp`` (a stub model): the MCP routes are
    there (offering the two tools), or answer 404, while the page is served either way."""
    args = webapp.parse_args(flags)
    with pytest.MonkeyPatch.context() as patch:  # build_demo allows its output folder in gradio's global paths
        patch.setattr(_StaticFiles, "all_paths", list(_StaticFiles.all_paths))
        demo = webapp.build_demo(ModelLoader.loaded(StubPipe(sphere_output)), tmp_path / "outputs")
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **webapp.launch_kwargs(mcp=args.mcp))
        offer_tools(demo)  # as app.main does
        try:
            url = f"http://127.0.0.1:{port}/"
            assert b"TriplaneTurbo" in fetch(url + "config")
            if args.mcp:
                assert sorted(t["name"] for t in json.loads(fetch(url + "gradio_api/mcp/schema"))) == \
                    ["generate", "variants"]
                return
            for route in ("gradio_api/mcp/", "gradio_api/mcp/schema", "gradio_api/mcp/sse"):
                with pytest.raises(urllib.error.HTTPError) as error:
                    fetch(url + route)
                assert error.value.code == 404, route
        finally:
            demo.close()
