import logging

# bitsandbytes' CPU backend warns at import that an optional kernel (fetched from a hub at run time) is
# missing; it falls back to its built-in kernel, and offline there is nothing a user can do about it.
# Set here, before anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
