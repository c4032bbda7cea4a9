"""What the server and the rank side both speak, owned by neither.

The wire models (``protocol``), SGLang's protocol generations (``generations``), the one error
tree (``errors``) and where the bearer token comes from (``auth``). Both ``service/`` and
``client/`` import this package; it imports neither, and nothing heavier than pydantic.
"""
