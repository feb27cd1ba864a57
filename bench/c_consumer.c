/*
 * The C reference consumer of the bench (P1): rabbitmq-c (librabbitmq) consuming one queue.
 *
 *   c_consumer HOST PORT USER PASSWORD VHOST QUEUE COUNT
 *
 * Protocol with the runner (same as the Python peers): prints {"event": "ready"} on stdout, waits
 * for a line ("go") on stdin, then connects, consumes QUEUE with manual acks (basic.ack with
 * multiple=true every 256 deliveries and once at the end), counts COUNT deliveries and prints
 * {"event": "done", "wall": s, "cpu": s, ...}. Like the Python peers it connects inside the timed
 * section.
 *
 * What it does per message: rabbitmq-c decodes the frames and the content header (properties,
 * including correlation_id); this program checks that a correlation id is present and sums the body
 * sizes. It does NOT decode the JSON body (the Python peers do): it is the ceiling of what a client
 * can get out of this broker, not a like-for-like client.
 *
 * Build: cc -O2 bench/c_consumer.c -lrabbitmq -o bench/c_consumer   (Debian: librabbitmq-dev)
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif

#define ACK_EVERY 256

static double now(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fail(const char *what, const char *detail) {
    printf("{\"event\": \"error\", \"error\": \"%s: %s\"}\n", what, detail ? detail : "");
    fflush(stdout);
    exit(1);
}

static void check_rpc(amqp_rpc_reply_t reply, const char *what) {
    switch (reply.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return;
    case AMQP_RESPONSE_NONE:
        fail(what, "missing RPC reply type");
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        fail(what, amqp_error_string2(reply.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        fail(what, "server exception (channel or connection closed by the broker)");
        break;
    }
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT USER PASSWORD VHOST QUEUE COUNT\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    const char *user = argv[3], *password = argv[4], *vhost = argv[5], *queue = argv[6];
    long wanted = atol(argv[7]);

    printf("{\"event\": \"ready\", \"queue\": \"%s\"}\n", queue);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin) || strncmp(line, "go", 2) != 0)
        fail("protocol", "expected go on stdin");

    double wall0 = now(CLOCK_MONOTONIC), cpu0 = now(CLOCK_PROCESS_CPUTIME_ID);

    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (!sock) fail("socket", "amqp_tcp_socket_new");
    int status = amqp_socket_open(sock, host, port);
    if (status) fail("connect", amqp_error_string2(status));
    check_rpc(amqp_login(conn, vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, user, password), "login");
    amqp_channel_open(conn, 1);
    check_rpc(amqp_get_rpc_reply(conn), "channel.open");
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(queue), amqp_empty_bytes, 0 /* no_local */,
                       0 /* no_ack */, 0 /* exclusive */, amqp_empty_table);
    check_rpc(amqp_get_rpc_reply(conn), "basic.consume");
    double connected = now(CLOCK_MONOTONIC) - wall0;

    long count = 0, since_ack = 0, missing_id = 0;
    uint64_t last_tag = 0, body_bytes = 0;
    while (count < wanted) {
        amqp_envelope_t envelope;
        amqp_maybe_release_buffers(conn);
        amqp_rpc_reply_t reply = amqp_consume_message(conn, &envelope, NULL, 0);
        if (reply.reply_type != AMQP_RESPONSE_NORMAL) {
            if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
                reply.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
                amqp_frame_t frame;  /* a non-delivery frame: read it and go on */
                if (amqp_simple_wait_frame(conn, &frame) != AMQP_STATUS_OK) fail("consume", "frame");
                continue;
            }
            check_rpc(reply, "consume");
        }
        if (!(envelope.message.properties._flags & AMQP_BASIC_CORRELATION_ID_FLAG) ||
            envelope.message.properties.correlation_id.len == 0)
            missing_id++;
        body_bytes += envelope.message.body.len;
        last_tag = envelope.delivery_tag;
        count++;
        if (++since_ack >= ACK_EVERY) {
            amqp_basic_ack(conn, 1, last_tag, 1);
            since_ack = 0;
        }
        amqp_destroy_envelope(&envelope);
    }
    if (since_ack) amqp_basic_ack(conn, 1, last_tag, 1);

    double wall = now(CLOCK_MONOTONIC) - wall0, cpu = now(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    printf("{\"event\": \"done\", \"kind\": \"c\", \"count\": %ld, \"ok\": %s, \"wall\": %.9f, "
           "\"cpu\": %.9f, \"connect_seconds\": %.9f, \"peak_rss\": %ld, \"body_bytes\": %llu, "
           "\"json_decoded\": false}\n",
           count, missing_id ? "false" : "true", wall, cpu, connected, (long)usage.ru_maxrss * 1024L,
           (unsigned long long)body_bytes);
    fflush(stdout);

    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    return 0;
}
