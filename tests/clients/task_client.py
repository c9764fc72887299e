"""A workload that starts a task over the sidecar's task API itself (not through the shell helper),
prints the credential as one JSON line, and exits when its stdin closes.

  task_client.py SOCKET TASK_ID SCOPE...
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent_sidecar.workload_client import start_task  # noqa: E402


def main() -> int:
    socket_path, task_id, *scopes = sys.argv[1:]
    try:
        cred = start_task(socket_path, task_id, scopes, 300, {}, 30)
    except Exception as e:  # noqa: BLE001 - reported to the test
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    print(json.dumps({"serial": cred.serial, "task_id": cred.task_id, "scopes": list(cred.scopes)}), flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
