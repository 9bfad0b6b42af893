"""Istio-identical iptables interception, the fallback data path (never imports bcc).

rules.py (pure: config -> iptables-restore payload), savefile.py (pure: iptables-save
reasoning), backend.py (runs iptables-save/-restore in a pod's netns), apply.py
(apply/verify/cleanup with rollback), interceptor.py (IptablesInterceptor),
commands.py (`meshbpf iptables ...`).
"""
