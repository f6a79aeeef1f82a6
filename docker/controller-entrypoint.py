"""Controller entrypoint: make sure the SSH key pair exists, then become the controller.

On first start it writes an ed25519 key pair into the `ssh-keys` volume: the private key
stays with the controller (SSH_KEY_FILE), the public key becomes `authorized_keys`, which
the nodes' sshd reads from the same volume (mounted read-only there). Later starts reuse it.
"""
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

key_file = os.environ["SSH_KEY_FILE"]
authorized_keys = os.path.join(os.path.dirname(key_file), "authorized_keys")

if not os.path.exists(key_file):
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    os.makedirs(os.path.dirname(key_file), exist_ok=True)
    with open(os.open(key_file + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(private)
    with open(authorized_keys + ".tmp", "wb") as f:
        f.write(public + b" pull-mode-controller\n")
    # sshd's StrictModes refuses an authorized_keys writable by group or others.
    os.chmod(authorized_keys + ".tmp", 0o644)
    os.replace(authorized_keys + ".tmp", authorized_keys)
    os.replace(key_file + ".tmp", key_file)
    print(f"controller-entrypoint: new SSH key pair in {os.path.dirname(key_file)}", flush=True)

# exec: python becomes PID 1 and gets docker's SIGTERM itself.
os.execvp(sys.argv[1], sys.argv[1:])
