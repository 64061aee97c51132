#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guard authors
# Apache License 2.0 (see LICENSE in the guard repository)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: guard_commit
short_description: Make a kept guard run final
description:
  - Runs C(guard commit --json RUN) on the host; the run's snapshots are dropped and the upgrade stays.
  - Unchanged when the run is already committed. Any other refusal fails with guard's message.
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
seealso:
  - module: guard.guard.guard_run
  - module: guard.guard.guard_rollback
'''

EXAMPLES = r'''
- name: The whole fleet is upgraded; drop the snapshots
  guard.guard.guard_commit:
    run: "{{ upgrade.run_id }}"
'''

RETURN = r'''
run_id:
  description: The run's number.
  returned: always
  type: int
outcome:
  description: committed after a commit.
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
    argument_spec = dict(run=dict(type='str', required=True))
    argument_spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    settle(module, 'commit', 'committed')


if __name__ == '__main__':
    main()
