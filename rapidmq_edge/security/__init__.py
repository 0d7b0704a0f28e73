"""Authentication (users file, scrypt hashes) and topic ACLs."""

from rapidmq_edge.security.acl import Acl
from rapidmq_edge.security.users import (
    UserDB,
    UsersFileError,
    add_user,
    hash_password,
    remove_user,
    verify_password,
)

__all__ = [
    "Acl",
    "UserDB",
    "UsersFileError",
    "add_user",
    "hash_password",
    "remove_user",
    "verify_password",
]
