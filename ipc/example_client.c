/* example_client.c: the example of README.md's "Using the C client", kept here so that it
 * compiles with every build (bazel build //ipc:example_client). */
#include <stdio.h>
#include <stdlib.h>

#include "ipc/moeclient.h"

int main(int argc, char **argv) {
    const char *endpoint = argc > 1 ? argv[1] : "tcp://127.0.0.1:5555";
    moec_client_t *c;
    if (moec_client_init(&c, endpoint, NULL) != MOEC_OK)
        return 1;

    char *info;                                   /* the model, as JSON */
    int st = moec_info(c, &info, 2000);
    if (st != MOEC_OK) {
        fprintf(stderr, "info: %s: %s\n", moec_status_name(st), moec_errmsg(c));
        moec_client_free(c);
        return 1;
    }
    printf("%s\n", info);
    moec_free(info);

    enum { T = 4, H = 64, K = 2 };                /* H must be the model's hidden size */
    float x[T * H], y[T * H], w[T * K];
    int32_t ids[T * K];
    for (int i = 0; i < T * H; i++)
        x[i] = (float)(i % 7) / 7.0f;
    for (int t = 0; t < T; t++) {
        ids[t * K] = t % 8, ids[t * K + 1] = (t + 1) % 8; /* experts chosen by your router */
        w[t * K] = 0.75f, w[t * K + 1] = 0.25f;
    }
    moec_request r = {.layer = 0, .dtype = MOEC_F32, .n_tokens = T, .hidden = H, .x = x,
                      .top_k = K, .topk_ids = ids, .topk_w = w};
    st = moec_submit(c, &r, y, sizeof y, 5000);   /* y [T, H]: the layer's MoE output */
    if (st != MOEC_OK)
        fprintf(stderr, "submit: %s: %s\n", moec_status_name(st), moec_errmsg(c));
    else
        printf("y[0][0..3] = %g %g %g %g\n", y[0], y[1], y[2], y[3]);
    moec_client_free(c);
    return st == MOEC_OK ? 0 : 1;
}
