#!/usr/bin/python
# Copyright: 2026 apmatrixd developers
# MIT License (see https://opensource.org/licenses/MIT)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: apmatrix_apply
short_description: Apply a declared AP crypto (vfio_ap) layout to an IBM Z KVM host
version_added: "0.2.0"
description:
  - Brings the host's AP configuration to a declared layout through apmatrixd (the
    C(org.apmatrix.Apmatrix1) D-Bus service) - the adapters and domains reserved for guests and
    every matrix (vfio_ap mediated device) by name.
  - The daemon decides the whole plan before it writes anything and applies it all or nothing;
    an invalid or conflicting layout changes nothing on the host and fails with the daemon's
    message, which names every problem (each clashing APQN and its owner).
  - Applying the same layout again changes nothing and reports C(changed=false).
  - Matrices that mdevctl manages or that were made outside apmatrixd are never touched; a
    declared matrix that clashes with one of them fails.
  - Runs C(apmatrixctl apply - --json) on the managed host, so Ansible's Python needs no D-Bus
    library; C(apmatrixctl) comes with the apmatrixd package.
options:
  layout:
    description:
      - The document, inline - a mapping with C(reserve) (C(adapters), C(domains)) and
        C(matrices), a list of mappings with C(name), optional C(uuid), C(adapters),
        C(domains), optional C(control_domains), C(autostart) and C(state)
        (C(active) or C(defined)).
      - Ids are hex strings as apmatrixctl takes them (V("05"), V("0x47"), V("4-7")) or
        integers. Quote hex ids in YAML (V("05")), or a bare 47 is read as the number 47.
      - Mutually exclusive with O(src).
    type: dict
  src:
    description:
      - Path of the document (YAML or JSON) on the managed host.
      - Mutually exclusive with O(layout). For a file on the controller, use
        O(layout) with C(lookup('file', ...) | from_yaml).
    type: path
  prune:
    description:
      - Also remove the matrices apmatrixd manages that the layout does not declare, and give
        the host's drivers back every adapter and domain the layout does not reserve.
      - A matrix a running guest uses is never removed or stopped; the task fails instead.
    type: bool
    default: false
  bus_address:
    description:
      - The D-Bus address of apmatrixd's bus (for example V(unix:path=/run/apmatrixd-demo/bus)).
      - Default is the system bus.
    type: str
  apmatrixctl:
    description:
      - The C(apmatrixctl) to run. Default is the one on the managed host's E(PATH).
    type: path
attributes:
  check_mode:
    support: full
    description: The daemon plans the change and reports it, changing nothing (a dry run).
  diff_mode:
    support: full
    description: The plan, one line per step, is the diff.
requirements:
  - apmatrixd 0.2.0 or newer running on the managed host (its C(apmatrixctl) on E(PATH))
notes:
  - Changing the layout needs root or the polkit action C(org.apmatrix.apmatrix1.apply)
    (use C(become)), a check included.
author:
  - apmatrixd developers (@apmatrix)
"""

EXAMPLES = r"""
- name: Crypto for the host's two guests
  apmatrix.apmatrix.apmatrix_apply:
    layout:
      reserve:
        adapters: ["05", "06"]
        domains: ["04", "47"]
      matrices:
        - name: guest1
          adapters: ["05", "06"]
          domains: ["04"]
          autostart: true
        - name: guest2
          adapters: ["05", "06"]
          domains: ["47"]
          autostart: true

- name: The layout from a file on the host, removing what it does not declare
  apmatrix.apmatrix.apmatrix_apply:
    src: /etc/apmatrixd/layout.yml
    prune: true

- name: Each host's own layout, from host_vars
  apmatrix.apmatrix.apmatrix_apply:
    layout: "{{ crypto_layout }}"
"""

RETURN = r"""
changed:
  description: Whether the layout changed the host (in check mode - would change it).
  returned: always
  type: bool
plan:
  description:
    - The steps, in the order the daemon does them; empty when the host is as declared.
    - Keys C(uuid), C(adapters), C(domains), C(control_domains) appear where a step has them
      (a matrix's new sets; the ids a host pool step moves).
  returned: success
  type: list
  elements: dict
  sample:
    - action: reserve
      target: host pool
      text: "reserve adapters 05,06, domains 04,47 for guests (from the host's drivers)"
      adapters: [5, 6]
      domains: [4, 71]
    - action: create
      target: guest1
      text: "create guest1: adapters 05,06 x domains 04, control domains 04; live"
      uuid: 0d4c7c6e-9b5a-4b8e-8f57-3f0d2d1c9a10
      adapters: [5, 6]
      domains: [4]
      control_domains: [4]
error:
  description: The daemon's error name (for example C(org.apmatrix.Apmatrix1.Error.Conflict)).
  returned: failure, when apmatrixd refused
  type: str
  sample: org.apmatrix.Apmatrix1.Error.Conflict
"""

import json

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec=dict(
            layout=dict(type="dict"),
            src=dict(type="path"),
            prune=dict(type="bool", default=False),
            bus_address=dict(type="str"),
            apmatrixctl=dict(type="path"),
        ),
        mutually_exclusive=[("layout", "src")],
        required_one_of=[("layout", "src")],
        supports_check_mode=True,
    )
    p = module.params
    ctl = p["apmatrixctl"] or module.get_bin_path("apmatrixctl", required=True)
    argv = [ctl]
    if p["bus_address"]:
        argv += ["--address", p["bus_address"]]
    argv += ["apply", p["src"] or "-", "--json"]
    if module.check_mode:
        argv.append("--check")
    if p["prune"]:
        argv.append("--prune")
    data = None if p["src"] else json.dumps(p["layout"])  # JSON is YAML
    rc, out, err = module.run_command(argv, data=data, binary_data=True)
    try:
        doc = json.loads(out) if out.strip() else {}
    except ValueError:
        doc = {}
    if rc != 0 or "error" in doc:
        error = doc.get("error") or {}
        msg = error.get("message") or err.strip() or out.strip() or "apmatrixctl exit %d" % rc
        module.fail_json(msg=msg, rc=rc, error=error.get("name") or "", stderr=err)
    changed = bool(doc.get("changed"))
    plan = doc.get("plan") or []
    result = dict(changed=changed, plan=plan)
    if module._diff:
        lines = ["%s\n" % step.get("text", "") for step in plan]
        result["diff"] = dict(
            before_header="apmatrixd",
            after_header="declared layout",
            prepared="".join("+ " + line for line in lines),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
