"""`python -m distillm2_jax.planning`: measure one config in this process (`devices.in_subprocess`).

Reads {"config": Config.model_dump(), "devices": N, "generation": bool} from stdin and prints
{"plan": Plan.to_dict()} or {"error": message} as the last line of stdout.
"""
from __future__ import annotations

import json
import sys


def main() -> int:
    from distillm2_jax.config.schema import from_raw
    from distillm2_jax.errors import UserError
    from distillm2_jax.planning import devices as devices_lib
    from distillm2_jax.planning.measure import measure

    request = json.loads(sys.stdin.read())
    try:
        cfg = from_raw(request["config"], {})
        found = devices_lib.local_devices(int(request["devices"]))
        if found is None:
            raise UserError(f"could not start {request['devices']} CPU devices")
        plan = measure(cfg, found, generation=bool(request.get("generation", True)))
    except UserError as err:
        print(json.dumps({"error": str(err)}))
        return 2
    print(json.dumps({"plan": plan.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
