# -*- coding: utf-8 -*-
# Copyright: guard authors
# Apache License 2.0 (see LICENSE in the guard repository)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    """The options every guard module takes: which guard, which state and configuration."""

    DOCUMENTATION = r'''
options:
  state_dir:
    description:
      - guard's state directory (C(--state-dir)); default as guard has it (C(GUARD_STATE_DIR), C(guard.conf), C(/var/lib/guard)).
    type: path
  config:
    description:
      - guard's configuration file (C(--config)).
    type: path
  binary:
    description:
      - The guard executable; default C(guard) on the PATH, in C(/usr/sbin) or C(/usr/local/sbin).
    type: path
notes:
  - guard needs root on the host (C(become)).
'''
