"""simulations/startup_profile.py: phases of a deployed ClientApp's life from py-spy's raw output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "simulations"))

import startup_profile as sp  # noqa: E402

NODE = 'process 10:"python3 flower-supernode --superlink 127.0.0.1:1";process 11:"python3 flower-superexec --insecure"'
FIT = 'process 20:"python3 /v/bin/flwr-clientapp --token abc"'
EVALUATE = 'process 21:"python3 /v/bin/flwr-clientapp --token def"'
MAIN = "<module> (flwr-clientapp:6);flwr_clientapp (flwr/supernode/cli/flwr_clientapp.py:42)"
RUN = MAIN + ";run_clientapp (flwr/supernode/runtime/run_clientapp.py:193)"
APP_FIT = (RUN + ";ClientApp.__call__ (flwr/clientapp/client_app.py:144);maybe_call_fit (flwr/compat/client/client.py:224)"
           ";FCLClient.fit (fcl_flower/client_app.py:109)")
RAW = "\n".join([
    # Flower's own imports before the app is loaded: 10 samples
    f"{NODE};{FIT};{MAIN};_find_and_load (<frozen importlib._bootstrap>:1176);<module> (flwr/supernode/cli/__init__.py:3) 10",
    # the fit path imports torch (via pretrain): 40 samples, MONAI: 20
    f"{NODE};{FIT};{APP_FIT};<module> (fcl_flower/pretrain.py:41);<module> (torch/__init__.py:10) 40",
    f"{NODE};{FIT};{APP_FIT};<module> (fcl_flower/models.py:28);<module> (monai/__init__.py:5) 20",
    # building the optimiser imports torch._dynamo: 30
    f"{NODE};{FIT};{APP_FIT};pretrain_round (fcl_flower/pretrain.py:255);_optimizer (fcl_flower/pretrain.py:198)"
    ";<module> (torch/_dynamo/__init__.py:1) 30",
    # training: 20
    f"{NODE};{FIT};{APP_FIT};pretrain_round (fcl_flower/pretrain.py:270);Tensor.backward (torch/_tensor.py:600) 20",
    # saving the state after the loop: 5
    f"{NODE};{FIT};{APP_FIT};pretrain_round (fcl_flower/pretrain.py:280);atomic_torch_save (fcl_flower/pretrain.py:90) 5",
    # a background thread of the fit process, and the evaluate process: not counted
    f"{NODE};{FIT};_bootstrap (threading.py:1002);HeartbeatSender._run (flwr/common/heartbeat.py:80) 500",
    f"{NODE};{EVALUATE};{RUN};maybe_call_evaluate (flwr/compat/client/client.py:250) 70",
    # another process of the tree
    f"{NODE};Server.run (flwr/server/server.py:10) 9",
])


def test_phases_of_fit_processes(tmp_path: Path):
    path = tmp_path / "deploy.txt"
    path.write_text(RAW + "\n")
    result = sp.summarize(path, rate_hz=10.0)
    assert result["fit_processes"] == 1 and result["other_processes"]["evaluate"] == 1
    seconds = result["seconds_per_fit_process"]
    assert seconds == {
        "app import: torch": 4.0, "app import: torch._dynamo (by torch.optim)": 3.0,
        "app import: monai": 2.0, "pretrain_round: training": 2.0, "Flower start-up: flwr-clientapp imports": 1.0,
        "pretrain_round: set-up and state save": 0.5,
    }
    assert sum(result["share"].values()) == pytest.approx(1.0)


def test_profile_without_fit_is_refused(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_text(f"{NODE};Server.run (flwr/server/server.py:10) 9\n")
    with pytest.raises(SystemExit, match="no flwr-clientapp process that served a fit"):
        sp.summarize(path, rate_hz=20.0)
