#!/bin/sh
# The official image runs redis-server with protected mode off: other containers connect.
if [ "$1" = "redis-server" ]; then
  shift
  exec redis-server "$@" --protected-mode no
fi
exec "$@"
