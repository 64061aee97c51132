#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guard authors
# Apache License 2.0 (see LICENSE in the guard repository)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: guard_rollback
short_description: Roll back a kept guard run
description:
  - Runs C(guard rollback --json RUN) on the host; the volumes read as before the run from the moment the merge starts.
  - Unchanged when the run is already rolled back. Any other refusal (committed, unfinished, an invalid snapshot) fails with guard's message.
  - In check mode it only reads the run (C(guard show --json)).
version_added: 0.1.0
author:
  - guard authors (@guard)
extends_documentation_fragment:
  - guard.guard.guard
options:
  run:
    description:
      - The run's number or token, as C(guard history) and M(guard.guard.guard_run) return it.
    type: str
    required: true
  wait:
    description:
      - Wait until the merge is complete and torn down.
    type: bool
    default: false
seealso:
  - module: guard.guard.guard_run
  - module: guard.guard.guard_commit
'''

EXAMPLES = r'''
- name: Undo last night's upgrade
  guard.guard.guard_rollback:
    run: "{{ upgrade.run_id }}"
    wait: true
'''

RETURN = r'''
run_id:
  description: The run's number.
  returned: always
  type: int
outcome:
  description: rolled_back after a rollback.
  returned: always
  type: str
state:
  description: merging while the merge runs (without I(wait)), finished after.
  returned: always
  type: str
snapshots:
  description: Each volume's snapshot with its state, size and peak COW use.
  returned: always
  type: list
  elements: dict
run:
  description: The run afterwards, as C(guard show --json) prints it.
  returned: always
  type: dict
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.guard.guard.plugins.module_utils.guard import COMMON_ARGS, settle


def main():
    argument_spec = dict(run=dict(type='str', required=True), wait=dict(type='bool', default=False))
    argument_spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    settle(module, 'rollback', 'rolled_back', ['--wait'] if module.params['wait'] else [])


if __name__ == '__main__':
    main()
