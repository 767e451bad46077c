"""The user-level connector (`python -m tpnb.connector`): the Kubernetes side of a session.

Runs as the invoking user: reads the user's kubeconfig (running its exec
credential plugins as that user), installs the traffic-manager, holds the
one port-forward to it, injects agents, keeps intercepts, environment and
volume access.  Serves the faces on a Unix socket in a directory only that
user can enter; drives the optional root daemon for system-wide outbound.
"""
