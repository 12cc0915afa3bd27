"""Inventories in ansible's three forms, host ranges, variable precedence, errors, fuzzing."""
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings

from launch.faults.fuzzing import check_inventory, inventory_texts
from launch.inventory import expand, hostfile, load_inventory
from testbed.core.errors import TestbedError
from tests.helpers import ROOT


def key(hosts):
    return sorted((h.name, h.address, h.port, h.user, h.key_file, h.python, h.profile, h.memory_mb, h.role,
                   h.workdir) for h in hosts)


def as_ansible_list(hosts) -> dict:
    """What `ansible-inventory --list` prints for the shipped lab (hostvars already merged)."""
    groups: dict[str, list[str]] = {}
    for h in hosts:
        groups.setdefault(h.groups[-1], []).append(h.name)
    out = {"_meta": {"hostvars": {h.name: h.vars for h in hosts}},
           "all": {"children": ["ungrouped", "server", "jetsons", "laptops"]},
           "jetsons": {"children": ["tx2", "orin"]}}
    out.update({g: {"hosts": names} for g, names in groups.items()})
    return out


def test_the_three_forms_of_the_shipped_lab_agree(tmp_path):
    yaml_hosts = load_inventory(ROOT / "inventory" / "jetsons.yaml")
    assert key(yaml_hosts) == key(load_inventory(ROOT / "inventory" / "jetsons.ini"))
    listed = tmp_path / "lab.json"
    listed.write_text(json.dumps(as_ansible_list(yaml_hosts)))
    assert key(load_inventory(listed)) == key(yaml_hosts)
    by = {h.name: h for h in yaml_hosts}
    assert by["agx-orin-01"].profile == "agx-orin"  # host var beats its group's
    assert by["orin-nano-01"].profile == "orin-nano" and by["orin-nano-01"].python == "/usr/bin/python3.10"
    assert by["tx2-02"].memory_mb == 1536 and by["tx2-02"].address == "tx2-02"
    assert by["laptop-b"].port == 2222 and by["workstation"].role == "aggregator"
    assert all(h.user == "lab" and h.key_file == "~/.ssh/testbed_lab" for h in yaml_hosts)


def test_host_ranges():
    assert expand("jetson[01:04]") == ["jetson01", "jetson02", "jetson03", "jetson04"]
    assert expand("n[a:c].lab") == ["na.lab", "nb.lab", "nc.lab"]
    assert expand("r[0:6:3]x[1:2]") == ["r0x1", "r0x2", "r3x1", "r3x2", "r6x1", "r6x2"]
    for bad in ("h[1]", "h[1:x]", "h[5:1]", "h[1:3:0]", "h[aa:bb]"):
        with pytest.raises(TestbedError, match="host pattern"):
            expand(bad)


def test_deeper_groups_override_shallower_and_siblings_merge_by_name(tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text("""
all:
  vars: {testbed_workdir: top, ansible_port: 1000}
  children:
    outer:
      vars: {testbed_workdir: outer}
      children:
        inner: {hosts: {h1: {}}, vars: {testbed_workdir: inner}}
    b_group: {hosts: {h1: {}}, vars: {ansible_port: 2000}}
    a_group: {hosts: {h1: {}, h2: {ansible_port: 9}}, vars: {ansible_port: 3000}}
""")
    hosts = {h.name: h for h in load_inventory(inv)}
    assert hosts["h1"].workdir == "inner" and hosts["h1"].port == 2000  # b_group after a_group at equal depth
    assert hosts["h2"].port == 9 and hosts["h2"].workdir == "top"


def test_a_host_may_name_its_own_device(tmp_path):
    inv = tmp_path / "inv.ini"
    inv.write_text("[jetsons]\norin1 testbed_device=cuda:0\ntx2 testbed_device=cpu\nother\n")
    hosts = {h.name: h for h in load_inventory(inv)}
    assert hosts["orin1"].device == "cuda:0" and hosts["tx2"].device == "cpu" and hosts["other"].device == ""


def test_a_host_may_be_described_by_a_profile_measured_on_it(tmp_path):
    (tmp_path / "tx2.yaml").write_text("a profile\n")  # read when the run sets up, where the model is known
    inv = tmp_path / "inv.yaml"
    inv.write_text("all:\n  hosts:\n    tx2.lab: {testbed_profile: '{{ inventory_dir }}/tx2.yaml'}\n"
                   "    nano: {testbed_profile: orin-nano}\n")
    hosts = {h.name: h for h in load_inventory(inv)}
    assert (hosts["tx2.lab"].profile, hosts["tx2.lab"].profile_file) == ("", str(tmp_path / "tx2.yaml"))
    assert (hosts["nano"].profile, hosts["nano"].profile_file) == ("orin-nano", "")
    inv.write_text("all:\n  hosts:\n    tx2: {testbed_profile: '{{ inventory_dir }}/missing.yaml'}\n")
    with pytest.raises(TestbedError, match="host tx2: testbed_profile .*missing.yaml not found"):
        load_inventory(inv)


@pytest.mark.parametrize("suffix, text, words", [
    (".yaml", "all:\n  hosts:\n    j1: {testbed_profile: jetson-nano-9000}\n", "host j1: testbed_profile"),
    (".yaml", "all:\n  hosts:\n    j1: {testbed_role: boss}\n", "host j1: testbed_role"),
    (".yaml", "all:\n  hosts:\n    j1: {testbed_device: gpu0}\n", "host j1: testbed_device 'gpu0' is not one of"),
    (".yaml", "all:\n  hosts:\n    j1: {ansible_port: 70000}\n", "host j1: ansible_port"),
    (".yaml", "all:\n  hosts:\n    a: {testbed_role: aggregator}\n    b: {testbed_role: aggregator}\n", "more than one"),
    (".yaml", "all:\n  hosts: [a, b]\n", "group all: hosts: expected a mapping"),
    (".yaml", "all:\n  host: {a: {}}\n", "unknown key 'host'"),
    (".yaml", "[not, a, mapping]\n", "expected a mapping of groups"),
    (".yaml", "all:\n  vars: {x: 1}\n", "no hosts"),
    (".ini", "[g]\nh1 ansible_port\n", "line 2: host h1: expected key=value"),
    (".ini", "[g:nonsense]\nh1\n", "line 1: bad section header"),
    (".ini", "[g:children]\nmissing\n[g]\nh1\n", None),
    (".json", "{\"all\": {\"hosts\": \"h1\"}}", "group all: hosts must be a list"),
    (".yaml", "all:\n  children:\n    a: {children: {b: {hosts: {h: {}}}}}\n    b: {children: {a: {}}}\n", "own ancestor"),
    (".json", "{not json", "not valid JSON"),
])
def test_bad_inventories_name_the_file_and_the_culprit(tmp_path, suffix, text, words):
    path = tmp_path / f"inv{suffix}"
    path.write_text(text)
    if words is None:  # an empty child group is fine
        assert [h.name for h in load_inventory(path)] == ["h1"]
        return
    with pytest.raises(TestbedError, match=words) as err:
        load_inventory(path)
    assert str(path) in str(err.value)


def test_missing_inventory(tmp_path):
    with pytest.raises(TestbedError, match="inventory not found"):
        load_inventory(tmp_path / "nope.yaml")


def test_hostfile_puts_the_aggregator_first():
    out = subprocess.run([sys.executable, "-m", "testbed.cli", "hostfile", "-i", str(ROOT / "inventory" / "jetsons.ini")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "192.168.50.10 slots=1" and len(lines) == 7
    assert hostfile(load_inventory(ROOT / "inventory" / "jetsons.yaml")) == out.stdout


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inventory_texts)
@example((".ini", "_,  s=0b_"))  # found by bench/faults.py: PyYAML raises ValueError on `0b_`
@example((".yaml", "all: {vars: {ansible_port: 0b_}}"))
def test_fuzzed_inventories_give_hosts_or_a_clear_error(tmp_path, suffix_and_text):
    check_inventory(tmp_path, suffix_and_text)


def test_ansible_magic_variables_name_files_beside_the_inventory(tmp_path):
    (tmp_path / "inv.ini").write_text("[lab]\nh1 ansible_host=10.0.0.2\n[lab:vars]\n"
                                      "ansible_ssh_private_key_file='{{ inventory_dir }}/keys/id'\n"
                                      "testbed_workdir='/w/{{inventory_hostname}}'\n"
                                      "testbed_known_hosts='{{ inventory_file }}.known {{ other }}'\n")
    (h,) = load_inventory(tmp_path / "inv.ini")
    assert h.key_file == f"{tmp_path.resolve()}/keys/id" and h.workdir == "/w/h1"
    assert h.known_hosts == f"{tmp_path.resolve()}/inv.ini.known {{{{ other }}}}"  # nothing else of Jinja
