"""The fleet seen from the broker: every box that shares a topic prefix, from one client.

``link`` is the client's connection, ``nodes`` the fleet's state from the retained
``available`` and ``status`` of every node, ``scatter`` one retrieval request to every
online node merged into one answer, ``rollout`` a model installed node after node. Nothing
here talks to a box except over MQTT: the fleet CLI runs anywhere the broker is reachable.
"""
