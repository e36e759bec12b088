/* A stand-in for libpcaudio.so.0, so that espeak-ng from its Debian packages runs on a machine without sound
   libraries (the GPU machines). `espeak-ng --stdout` writes a WAV and never opens an audio device: these
   functions only satisfy the dynamic linker. Built by bench/stages_gpu.py (portable_espeak). */
#include <stddef.h>
#include <stdint.h>

struct audio_object;

struct audio_object *create_audio_device_object(const char *device, const char *app, const char *name) { return NULL; }
int audio_object_open(struct audio_object *o, int format, uint32_t rate, uint8_t channels) { return -1; }
void audio_object_close(struct audio_object *o) {}
void audio_object_destroy(struct audio_object *o) {}
int audio_object_write(struct audio_object *o, const void *data, size_t bytes) { return -1; }
int audio_object_drain(struct audio_object *o) { return 0; }
int audio_object_flush(struct audio_object *o) { return 0; }
const char *audio_object_strerror(struct audio_object *o, int error) { return "no audio device (stub)"; }
