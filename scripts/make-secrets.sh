#!/usr/bin/env bash
# Create the secret files that docker-compose.yml mounts under /run/secrets
# (and that `python -m service stack up` uses for the local stack):
#
#   rabbitmq_{admin,publisher,worker,monitor,console}_password
#                                                         random, one broker user per role
#   rabbitmq_erlang_cookie                               random, the Erlang cookie the nodes of the
#                                                         3-node cluster share (docker-compose.cluster.yml)
#   grafana_admin_password                               random, Grafana's admin
#   flower_basic_auth                                    kit:<random>, Flower's login (user:password,
#                                                         `python -m service flower`)
#   alertmanager_webhook_token                           random, the bearer token Alertmanager sends
#                                                         to the chat-bot relay (both read this file)
#   alertmanager_{slack_api_url,smtp_password,           EMPTY: the receivers' secrets are
#     pagerduty_routing_key}                              site values you fill in
#                                                         (deploy/alertmanager/README.md)
#   relay_{wecom_ops,dingtalk_oncall,feishu_team}        EMPTY: the chat bots' URLs and signing
#                                                         secrets (deploy/alertmanager/relay.yml names
#                                                         them); the relay skips a bot whose file is empty
#
# Usage: scripts/make-secrets.sh [DIR]      (default: ./secrets, which git ignores)
#
# Existing files are never changed, so running it again is harmless; to rotate a
# password delete its file and run it again (then recreate broker-definitions and
# rabbitmq, or run `python -m service broker provision`). A new Erlang cookie takes
# all three cluster nodes restarted together: nodes with different cookies cannot
# talk to each other.
#
# Modes: the directory is 0700, so no other user of this machine can read
# anything in it. The files are 0644 because compose (without swarm) mounts them
# as they are, and the containers read them as their own non-root users (kit
# 10001, rabbitmq 999, grafana 472, nobody); 0600 files would be unreadable there.
# (The cluster nodes copy the cookie into a 0400 file of their own at start, as
# Erlang demands.)
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${1:-secrets}"
install -d -m 0700 "$dir"
chmod 0700 "$dir"

random_value() {
    # 48 hex characters (192 bits): safe in URLs, shells and config files as is.
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

created=()
for name in rabbitmq_admin_password rabbitmq_publisher_password rabbitmq_worker_password \
            rabbitmq_monitor_password rabbitmq_console_password rabbitmq_erlang_cookie \
            grafana_admin_password alertmanager_webhook_token; do
    file="$dir/$name"
    if [ ! -s "$file" ]; then
        (umask 077; random_value > "$file")
        created+=("$name")
    fi
    chmod 0644 "$file"
done
# Flower's basic auth: one user:password line (the user is kit; log in with the file's password).
file="$dir/flower_basic_auth"
if [ ! -s "$file" ]; then
    (umask 077; printf 'kit:%s\n' "$(random_value)" > "$file")
    created+=("flower_basic_auth")
fi
chmod 0644 "$file"
for name in alertmanager_slack_api_url alertmanager_smtp_password alertmanager_pagerduty_routing_key \
            relay_wecom_ops relay_dingtalk_oncall relay_feishu_team; do
    file="$dir/$name"
    if [ ! -e "$file" ]; then
        : > "$file"
        created+=("$name (empty: fill it in)")
    fi
    chmod 0644 "$file"
done
if [ ${#created[@]} -gt 0 ]; then
    printf 'created in %s: %s\n' "$dir" "${created[*]}"
fi
