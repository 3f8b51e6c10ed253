"""The client recipes name models Kimi serves, and their config snippets parse.

Agents that speak for Claude (Claude Code, OpenCode's title request) ask for Claude model ids unless told otherwise;
Kimi refuses those, so every recipe must name a Kimi model for each role. The ids allowed here are the ones Kimi
serves on each surface (Kimi Code serves `kimi-for-coding`; the Open Platform serves the `kimi-k*` and
`moonshot-v1-*` families).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib

from test_readme import _FENCE, readme_text, section

KIMI_CODE_MODELS = {"kimi-for-coding", "kimi-for-coding-highspeed"}
OPEN_PLATFORM_MODEL = re.compile(r"^(kimi-k\d[\w.-]*|moonshot-v1-[\w-]+)$")
CLAUDE_MODEL_VARS = ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL",
                     "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "CLAUDE_CODE_SUBAGENT_MODEL")


def recipe(title: str) -> str:
    found = re.search(rf"^### {re.escape(title)}\b[^\n]*\n(.*?)(?=^##)", section(readme_text(), "Client recipes"),
                      re.MULTILINE | re.DOTALL)
    assert found, f"README.md has no '### {title}' recipe"
    return found.group(1)


def exports(block: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            found.update(word.split("=", 1) for word in words[1:] if "=" in word)  # type: ignore[misc]
    return found


def allowed(base_url: str, model: str) -> bool:
    if "api.kimi.com" in base_url:
        return model in KIMI_CODE_MODELS
    assert "api.moonshot." in base_url, base_url
    return bool(OPEN_PLATFORM_MODEL.match(model))


def test_claude_code_names_a_kimi_model_for_every_role() -> None:
    blocks = [exports(b) for b in _FENCE.findall(recipe("Claude Code")) if "ANTHROPIC_BASE_URL" in b]
    bases = {env["ANTHROPIC_BASE_URL"] for env in blocks}
    assert any("api.kimi.com" in b for b in bases) and any("api.moonshot." in b for b in bases), bases
    for env in blocks:
        assert env.get("ANTHROPIC_API_KEY") == "placeholder", env
        for var in CLAUDE_MODEL_VARS:
            assert var in env, f"the Claude Code recipe for {env['ANTHROPIC_BASE_URL']} does not set {var}"
            assert allowed(env["ANTHROPIC_BASE_URL"], env[var]), f"{var}={env[var]} on {env['ANTHROPIC_BASE_URL']}"


def test_opencode_config_names_its_small_model() -> None:
    blocks = [b for b in _FENCE.findall(recipe("OpenCode")) if b.lstrip().startswith("{")]
    assert len(blocks) == 1
    config = json.loads(blocks[0])
    provider = config["provider"]["anthropic"]
    declared = {f"anthropic/{name}" for name in provider["models"]}
    assert config["model"] in declared and config["small_model"] in declared, config
    for name in provider["models"]:
        assert allowed(provider["options"]["baseURL"], name)
    assert provider["options"]["apiKey"] == "placeholder"


def test_kimi_cli_recipe_pins_a_working_release() -> None:
    text = recipe("Kimi CLI")
    installs = re.findall(r"(?:pipx|uv tool|pip) install\s+([^\s`,]+)", text)
    assert installs and all(spec == "kimi-cli==1.51.0" for spec in installs if spec.startswith("kimi-cli")), installs
    assert "@moonshot-ai/kimi-code" in text and "22.19" in text
    blocks = [b for b in _FENCE.findall(text) if "[providers." in b]
    assert len(blocks) == 1
    config = tomllib.loads(blocks[0])
    model = config["models"][config["default_model"]]
    provider = config["providers"][model["provider"]]
    assert provider["api_key"] == "placeholder" and allowed(provider["base_url"], model["model"])
