"""Files that run inside the guest VM (stdlib only): the init script and the agent."""

from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent
AGENT_PATH = GUEST_DIR / "agent.py"
INIT_PATH = GUEST_DIR / "init.sh"
AGENT_PORT_NAME = "org.forkd.agent.0"
