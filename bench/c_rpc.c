/*
 * The C RPC pair of the bench (P7) on rabbitmq-c (librabbitmq): a client with COUNT calls in flight,
 * and an echo responder.
 *
 *   c_rpc client HOST PORT USER PASSWORD VHOST QUEUE COUNT WARMUP
 *   c_rpc echo   HOST PORT USER PASSWORD VHOST QUEUE PREFETCH
 *
 * client: connects, declares an exclusive server-named reply queue and consumes it (manual acks),
 * runs WARMUP calls, prints {"event": "ready", "queue": ...}, waits for a line ("go") on stdin, then
 * publishes COUNT requests to QUEUE (the message rpcresults' Client.call sends: JSON body = the call's
 * index, content_type application/json, content_encoding utf-8, empty headers, delivery_mode 2,
 * priority 0, reply_to, correlation_id "c-PID-INDEX") and consumes the COUNT replies (basic.ack with
 * multiple=true every 256 and at the end). Each reply is checked: a correlation id of this batch not
 * seen before, and a body equal to the request's. Prints {"event": "done", "wall": s, "cpu": s, ...}.
 *
 * echo: consumes QUEUE with basic.qos PREFETCH and manual acks; publishes each request's body
 * verbatim to its reply_to (content_type application/json, content_encoding utf-8, delivery_mode 1,
 * priority 0, the request's correlation_id), then acks the request. It decodes no JSON: the pair is
 * the ceiling of this broker, not a like-for-like client. Stops when stdin closes (checked whenever
 * no request arrived for 200 ms) and prints {"event": "done", "served": N, "cpu": s} (its CPU time, as
 * "ready" does, so the runner gets the responder's CPU per call).
 *
 * Build: cc -O2 bench/c_rpc.c -lrabbitmq -o bench/c_rpc   (Debian: librabbitmq-dev)
 */
#define _POSIX_C_SOURCE 200809L
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

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

static void check_status(int status, const char *what) {
    if (status != AMQP_STATUS_OK) fail(what, amqp_error_string2(status));
}

static amqp_connection_state_t open_connection(char **argv) {
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (!sock) fail("socket", "amqp_tcp_socket_new");
    int status = amqp_socket_open(sock, argv[2], atoi(argv[3]));
    if (status) fail("connect", amqp_error_string2(status));
    check_rpc(amqp_login(conn, argv[6], 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, argv[4], argv[5]), "login");
    amqp_channel_open(conn, 1);
    check_rpc(amqp_get_rpc_reply(conn), "channel.open");
    return conn;
}

/* The next delivery; 0 on success, 1 on timeout (only with a timeout). */
static int next_delivery(amqp_connection_state_t conn, amqp_envelope_t *envelope, struct timeval *timeout) {
    for (;;) {
        amqp_maybe_release_buffers(conn);
        amqp_rpc_reply_t reply = amqp_consume_message(conn, envelope, timeout, 0);
        if (reply.reply_type == AMQP_RESPONSE_NORMAL) return 0;
        if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
            if (reply.library_error == AMQP_STATUS_TIMEOUT && timeout) return 1;
            if (reply.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
                amqp_frame_t frame; /* a non-delivery frame: read it and go on */
                if (amqp_simple_wait_frame(conn, &frame) != AMQP_STATUS_OK) fail("consume", "frame");
                continue;
            }
        }
        check_rpc(reply, "consume");
    }
}

/* -- client ------------------------------------------------------------------------------------ */
static long wrong;

static void calls(amqp_connection_state_t conn, amqp_bytes_t queue, amqp_bytes_t reply_to, long first,
                  long count) {
    char id[64], body[32];
    char *seen = calloc(count > 0 ? (size_t)count : 1, 1);
    if (!seen) fail("calls", "out of memory");
    amqp_basic_properties_t props;
    memset(&props, 0, sizeof props);
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_CONTENT_ENCODING_FLAG | AMQP_BASIC_HEADERS_FLAG |
                   AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_PRIORITY_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG |
                   AMQP_BASIC_REPLY_TO_FLAG;
    props.content_type = amqp_cstring_bytes("application/json");
    props.content_encoding = amqp_cstring_bytes("utf-8");
    props.headers = amqp_empty_table;
    props.delivery_mode = 2;
    props.priority = 0;
    props.reply_to = reply_to;
    long pid = (long)getpid();
    for (long index = first; index < first + count; index++) {
        int id_len = snprintf(id, sizeof id, "c-%ld-%ld", pid, index);
        int body_len = snprintf(body, sizeof body, "%ld", index);
        props.correlation_id.bytes = id;
        props.correlation_id.len = (size_t)id_len;
        amqp_bytes_t payload = {(size_t)body_len, body};
        check_status(amqp_basic_publish(conn, 1, amqp_empty_bytes, queue, 0, 0, &props, payload), "publish");
    }
    char prefix[32];
    int prefix_len = snprintf(prefix, sizeof prefix, "c-%ld-", pid);
    long got = 0, since_ack = 0;
    uint64_t last_tag = 0;
    while (got < count) {
        amqp_envelope_t envelope;
        next_delivery(conn, &envelope, NULL);
        amqp_basic_properties_t *p = &envelope.message.properties;
        long index = -1;
        if ((p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) && p->correlation_id.len > (size_t)prefix_len &&
            p->correlation_id.len < sizeof id && memcmp(p->correlation_id.bytes, prefix, prefix_len) == 0) {
            memcpy(id, p->correlation_id.bytes, p->correlation_id.len);
            id[p->correlation_id.len] = '\0';
            index = strtol(id + prefix_len, NULL, 10);
        }
        if (index < first || index >= first + count || seen[index - first]) {
            wrong++; /* not one of ours, or twice: it does not count */
        } else {
            int body_len = snprintf(body, sizeof body, "%ld", index);
            if (envelope.message.body.len != (size_t)body_len ||
                memcmp(envelope.message.body.bytes, body, body_len) != 0)
                wrong++;
            seen[index - first] = 1;
            got++;
        }
        last_tag = envelope.delivery_tag;
        if (++since_ack >= ACK_EVERY) {
            check_status(amqp_basic_ack(conn, 1, last_tag, 1), "ack");
            since_ack = 0;
        }
        amqp_destroy_envelope(&envelope);
    }
    if (since_ack) check_status(amqp_basic_ack(conn, 1, last_tag, 1), "ack");
    free(seen);
}

static int client(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: %s client HOST PORT USER PASSWORD VHOST QUEUE COUNT WARMUP\n", argv[0]);
        return 2;
    }
    amqp_bytes_t queue = amqp_cstring_bytes(argv[7]);
    long count = atol(argv[8]), warmup = atol(argv[9]);
    amqp_connection_state_t conn = open_connection(argv);
    amqp_queue_declare_ok_t *declared = amqp_queue_declare(conn, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    check_rpc(amqp_get_rpc_reply(conn), "queue.declare");
    amqp_bytes_t reply_to = amqp_bytes_malloc_dup(declared->queue);
    amqp_basic_consume(conn, 1, reply_to, amqp_empty_bytes, 0, 0 /* no_ack */, 1, amqp_empty_table);
    check_rpc(amqp_get_rpc_reply(conn), "basic.consume");

    calls(conn, queue, reply_to, 0, warmup);
    printf("{\"event\": \"ready\", \"queue\": \"%.*s\", \"warmup_wrong\": %ld}\n", (int)reply_to.len,
           (char *)reply_to.bytes, wrong);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin) || strncmp(line, "go", 2) != 0) fail("protocol", "expected go on stdin");

    wrong = 0;
    double wall0 = now(CLOCK_MONOTONIC), cpu0 = now(CLOCK_PROCESS_CPUTIME_ID);
    calls(conn, queue, reply_to, warmup, count);
    double wall = now(CLOCK_MONOTONIC) - wall0, cpu = now(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
    printf("{\"event\": \"done\", \"kind\": \"c\", \"count\": %ld, \"ok\": %s, \"wrong\": %ld, \"wall\": %.9f, "
           "\"cpu\": %.9f, \"queue\": \"%.*s\"}\n",
           count, wrong ? "false" : "true", wrong, wall, cpu, (int)reply_to.len, (char *)reply_to.bytes);
    fflush(stdout);
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    amqp_bytes_free(reply_to);
    return 0;
}

/* -- echo -------------------------------------------------------------------------------------- */
static int stdin_closed(void) {
    struct pollfd fd = {0, POLLIN, 0};
    if (poll(&fd, 1, 0) <= 0) return 0;
    char buffer[256];
    return read(0, buffer, sizeof buffer) <= 0;
}

static int echo(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s echo HOST PORT USER PASSWORD VHOST QUEUE PREFETCH\n", argv[0]);
        return 2;
    }
    amqp_connection_state_t conn = open_connection(argv);
    amqp_basic_qos(conn, 1, 0, (uint16_t)atoi(argv[8]), 0);
    check_rpc(amqp_get_rpc_reply(conn), "basic.qos");
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(argv[7]), amqp_empty_bytes, 0, 0 /* no_ack */, 0,
                       amqp_empty_table);
    check_rpc(amqp_get_rpc_reply(conn), "basic.consume");
    printf("{\"event\": \"ready\", \"queue\": \"%s\", \"cpu\": %.9f}\n", argv[7], now(CLOCK_PROCESS_CPUTIME_ID));
    fflush(stdout);

    amqp_basic_properties_t props;
    memset(&props, 0, sizeof props);
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_CONTENT_ENCODING_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
                   AMQP_BASIC_PRIORITY_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG;
    props.content_type = amqp_cstring_bytes("application/json");
    props.content_encoding = amqp_cstring_bytes("utf-8");
    props.delivery_mode = 1;
    props.priority = 0;
    long served = 0, no_reply_to = 0;
    for (;;) {
        amqp_envelope_t envelope;
        struct timeval timeout = {0, 200000};
        if (next_delivery(conn, &envelope, &timeout)) {
            if (stdin_closed()) break;
            continue;
        }
        amqp_basic_properties_t *p = &envelope.message.properties;
        if ((p->_flags & AMQP_BASIC_REPLY_TO_FLAG) && p->reply_to.len) {
            props.correlation_id = p->correlation_id; /* empty when the request has none */
            check_status(amqp_basic_publish(conn, 1, amqp_empty_bytes, p->reply_to, 0, 0, &props,
                                            envelope.message.body), "publish");
            served++;
        } else {
            no_reply_to++;
        }
        check_status(amqp_basic_ack(conn, 1, envelope.delivery_tag, 0), "ack");
        amqp_destroy_envelope(&envelope);
    }
    printf("{\"event\": \"done\", \"served\": %ld, \"no_reply_to\": %ld, \"cpu\": %.9f}\n", served, no_reply_to,
           now(CLOCK_PROCESS_CPUTIME_ID));
    fflush(stdout);
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "client") == 0) return client(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "echo") == 0) return echo(argc, argv);
    fprintf(stderr, "usage: %s client|echo HOST PORT USER PASSWORD VHOST QUEUE ...\n", argv[0]);
    return 2;
}
