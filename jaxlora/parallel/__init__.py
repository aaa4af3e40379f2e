"""Scale-out: the device mesh, logical-axis rules and shardings (`sharding`), and the multi-host
bootstrap and collectives helpers (`distributed`). No model or trainer imports: every other layer
asks here how to place a tree or a batch.
"""
