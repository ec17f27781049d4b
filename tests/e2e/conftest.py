"""End-to-end fixtures: a real mosquitto broker, and the seed's garage run once
per session with every charger on the MicroPython unix port."""
import pytest

from evse_tools import broker as brokers
from evse_tools.sim.run import SCENARIOS, LoadGroupSim
from evse_tools.sim.scenario import load


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    if brokers.mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: `apt-get install -y mosquitto` (.ci/run does it)")
    b = brokers.start_mosquitto(workdir=tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.close()


def _run(name, broker, tmp_path_factory):
    sc = load(SCENARIOS / f"{name}.toml")
    lines = []
    with LoadGroupSim(sc, broker, tmp_path_factory.mktemp(name), out=lines.append) as sim:
        rec = sim.run()
    rec.lines = lines
    return rec


@pytest.fixture(scope="session")
def garage(mosquitto, tmp_path_factory):
    """The whole seed scenario (tools/scenarios/garage.toml), recorded."""
    return _run("garage", mosquitto, tmp_path_factory)


@pytest.fixture(scope="session")
def gfci_run(mosquitto, tmp_path_factory):
    """tools/scenarios/gfci.toml: charger 1's GFCI trips while both charge."""
    return _run("gfci", mosquitto, tmp_path_factory)
