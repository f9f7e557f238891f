#!/usr/bin/env bash
# Start the local RabbitMQ (if it is not running) with the management and
# prometheus plugins, and wait until it accepts connections. Usage:
#   scripts/broker.sh start | stop | status
set -euo pipefail

wait_ready() {
    for _ in $(seq 1 60); do
        if rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "RabbitMQ did not start within 60s; see /var/log/rabbitmq/" >&2
    return 1
}

case "${1:-start}" in
    start)
        if ! rabbitmqctl -q status >/dev/null 2>&1; then
            echo ">> starting rabbitmq-server"
            if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
                systemctl start rabbitmq-server
            else
                rabbitmq-server -detached
            fi
        fi
        wait_ready
        rabbitmq-plugins -q enable rabbitmq_management rabbitmq_prometheus >/dev/null
        # The management API answers a little after the plugin is enabled.
        for _ in $(seq 1 30); do
            if rabbitmq-diagnostics -q check_port_listener 15672 >/dev/null 2>&1; then
                echo ">> RabbitMQ is up (AMQP 5672, management http://127.0.0.1:15672)"
                exit 0
            fi
            sleep 1
        done
        echo "the RabbitMQ management API did not answer on 15672" >&2
        exit 1
        ;;
    stop)
        rabbitmqctl -q stop >/dev/null 2>&1 || true
        ;;
    status)
        rabbitmqctl -q status >/dev/null 2>&1 && echo "RabbitMQ is running" || { echo "RabbitMQ is not running"; exit 1; }
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
